// OpenChroma voice chat: microphone -> /v1/realtime (OpenAI Realtime protocol, server VAD) -> speakers.
// Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const RATE = 24000;
const $ = (id) => document.getElementById(id);

// What the page saw, for people and for the browser test.
const stats = window.chromaStats = {
  speechStarted: 0, speechStopped: 0, responses: 0, samplesReceived: 0, samplesPlayed: 0,
  latencyMs: null, latencies: [], bargeIns: 0, errors: [],
};

let audioContext = null, microphone = null, capture = null, player = null, socket = null;
let current = null; // the answer being received: {responseId, itemId, element, samples, cut}
let userTurn = null; // the transcript element of the user's turn in progress
let speechStoppedAt = null;

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function setState(text) {
  $("state").textContent = text;
  $("state").className = "state " + text;
}

function showProblem(message) {
  stats.errors.push(message);
  $("problem").textContent = message;
  $("problem").hidden = false;
}

function addTurn(role, text) {
  const element = document.createElement("div");
  element.className = "turn " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Chroma";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  element.append(who, body);
  $("transcript").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function setTurnText(element, text) {
  element.querySelector(".text").textContent = text;
}

function updateFigures() {
  $("received").textContent = (stats.samplesReceived / RATE).toFixed(1) + " s";
  $("played").textContent = (stats.samplesPlayed / RATE).toFixed(1) + " s";
  $("turns").textContent = String(stats.responses);
  $("latency").textContent = stats.latencyMs === null ? "–" : Math.round(stats.latencyMs) + " ms";
}

// -- voices -------------------------------------------------------------------------------------------------------

async function loadVoices(selected) {
  const response = await fetch("/v1/audio/voices", { headers: authHeaders() });
  if (!response.ok) {
    showProblem("Could not list voices: HTTP " + response.status);
    return;
  }
  const voices = (await response.json()).data;
  const select = $("voice");
  select.replaceChildren(...voices.map((v) => new Option(v.name + " (" + v.id + ")", v.id)));
  if (selected) select.value = selected;
  if (!voices.length) showProblem("No voice is registered yet: upload one below.");
}

async function uploadVoice(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("audio_sample", $("upload-file").files[0]);
  form.append("transcript", $("upload-text").value);
  form.append("name", $("upload-name").value || "my voice");
  $("upload-result").textContent = "uploading…";
  const response = await fetch("/v1/audio/voices", { method: "POST", body: form, headers: authHeaders() });
  const body = await response.json();
  if (!response.ok) {
    $("upload-result").textContent = body.error ? body.error.message : "HTTP " + response.status;
    return;
  }
  $("upload-result").textContent = "added " + body.id;
  await loadVoices(body.id);
  if (socket) send({ type: "session.update", session: { type: "realtime", audio: { output: { voice: body.id } } } });
}

// -- the socket -----------------------------------------------------------------------------------------------------

function send(event) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(event));
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function pcm16ToFloat(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const samples = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  const out = new Float32Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = samples[i] / 32768;
  return out;
}

async function connect() {
  const models = await (await fetch("/v1/models", { headers: authHeaders() })).json();
  const url = new URL("/v1/realtime?model=" + encodeURIComponent(models.data[0].id), location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const key = $("api-key").value.trim();
  socket = new WebSocket(url, key ? ["realtime", "openai-insecure-api-key." + key] : ["realtime"]);
  socket.onmessage = (message) => onServerEvent(JSON.parse(message.data));
  socket.onclose = () => { socket = null; stop(); };
  await new Promise((resolve, reject) => { socket.onopen = resolve; socket.onerror = () => reject(new Error("socket")); });
  send({
    type: "session.update",
    session: {
      type: "realtime",
      output_modalities: ["audio"],
      audio: {
        input: { format: { type: "audio/pcm", rate: RATE },
                 turn_detection: { type: "server_vad", silence_duration_ms: 500, prefix_padding_ms: 300 } },
        output: { format: { type: "audio/pcm", rate: RATE }, voice: $("voice").value || undefined },
      },
    },
  });
}

function onServerEvent(event) {
  const handler = HANDLERS[event.type];
  if (handler) handler(event);
}

const HANDLERS = {
  "input_audio_buffer.speech_started": (event) => {
    stats.speechStarted++;
    setState("listening");
    if (current && !current.finished || playerQueued > 0) bargeIn();
    userTurn = addTurn("user", "speaking…");
    userTurn.dataset.start = event.audio_start_ms;
  },
  "input_audio_buffer.speech_stopped": (event) => {
    stats.speechStopped++;
    speechStoppedAt = performance.now();
    if (userTurn) {
      const seconds = (event.audio_end_ms - Number(userTurn.dataset.start)) / 1000;
      setTurnText(userTurn, "(spoken, " + seconds.toFixed(1) + " s)");
    }
  },
  "response.created": (event) => {
    stats.responses++;
    current = { responseId: event.response.id, itemId: null, element: addTurn("assistant", ""), text: "",
                samples: 0, first: true, finished: false };
    updateFigures();
  },
  "response.output_item.added": (event) => { if (current) current.itemId = event.item.id; },
  "response.output_audio_transcript.delta": (event) => {
    if (!current || event.response_id !== current.responseId) return;
    current.text += event.delta;
    setTurnText(current.element, current.text);
  },
  "response.output_audio.delta": (event) => {
    if (!current || event.response_id !== current.responseId) return;
    const samples = pcm16ToFloat(event.delta);
    if (current.first) {
      current.first = false;
      player.port.postMessage({ type: "start" });
      if (speechStoppedAt !== null) {
        stats.latencyMs = performance.now() - speechStoppedAt;
        stats.latencies.push(stats.latencyMs);
        speechStoppedAt = null;
      }
    }
    current.samples += samples.length;
    stats.samplesReceived += samples.length;
    player.port.postMessage({ type: "push", samples: samples }, [samples.buffer]);
    setState("speaking");
    updateFigures();
  },
  "response.done": (event) => {
    if (current && event.response.id === current.responseId) {
      current.finished = true;
      if (event.response.status === "cancelled") {
        current.element.classList.add("cut");
        current.element.querySelector(".who").textContent = "Chroma (interrupted)";
      }
    }
    if (event.response.status === "failed") showProblem("The answer failed: " + JSON.stringify(event.response.status_details));
  },
  "conversation.item.truncated": (event) => {
    const element = document.querySelector('[data-item="' + event.item_id + '"]');
    if (element) element.classList.add("cut");
  },
  "error": (event) => showProblem(event.error.message),
};

// Barge-in: the server already cancelled the answer; stop playing it and tell the server how much was heard, so
// the conversation keeps only the words the user actually heard.
let playerQueued = 0;
function bargeIn() {
  if (!current || !current.itemId) return;
  stats.bargeIns++;
  current.element.dataset.item = current.itemId;
  player.port.postMessage({ type: "clear", request: current.itemId });
}

function onPlayerMessage(message) {
  if (message.type === "played") {
    stats.samplesPlayed = message.total;
    playerQueued = message.queued;
    if (message.queued === 0 && current && current.finished) setState("listening");
    updateFigures();
  } else if (message.type === "cleared" && message.request) {
    const heardMs = Math.floor(message.played / (RATE / 1000));
    send({ type: "conversation.item.truncate", item_id: message.request, content_index: 0, audio_end_ms: heardMs });
    playerQueued = 0;
  }
}

// -- audio ------------------------------------------------------------------------------------------------------------

async function start() {
  $("start").disabled = true;
  $("problem").hidden = true;
  try {
    audioContext = new AudioContext({ sampleRate: RATE });
    await audioContext.audioWorklet.addModule("/static/audio-worklet.js");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    microphone = audioContext.createMediaStreamSource(stream);
    capture = new AudioWorkletNode(audioContext, "pcm-capture");
    player = new AudioWorkletNode(audioContext, "pcm-player", { outputChannelCount: [1] });
    player.port.onmessage = (message) => onPlayerMessage(message.data);
    player.connect(audioContext.destination);
    const mute = audioContext.createGain();
    mute.gain.value = 0; // the capture node must be pulled by the graph, but the microphone is not played back
    microphone.connect(capture).connect(mute).connect(audioContext.destination);
    await connect();
    capture.port.onmessage = (message) => send({ type: "input_audio_buffer.append", audio: toBase64(message.data) });
    await audioContext.resume();
    setState("listening");
    $("stop").disabled = false;
  } catch (error) {
    showProblem("Could not start: " + error.message);
    stop();
  }
}

function stop() {
  if (socket) socket.close();
  if (microphone) microphone.mediaStream.getTracks().forEach((track) => track.stop());
  if (audioContext) audioContext.close();
  socket = microphone = capture = player = audioContext = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  setState("idle");
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("upload").addEventListener("submit", uploadVoice);
loadVoices();
