// Audio worklets of the OpenChroma voice-chat page (runs in the AudioContext at 24 kHz).
//   pcm-capture: microphone -> PCM16 pieces of 20 ms, posted to the page
//   pcm-player:  PCM float pieces from the page -> speakers, counting the samples actually played

const CAPTURE_SAMPLES = 480; // 20 ms at 24 kHz

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.piece = new Int16Array(CAPTURE_SAMPLES);
    this.fill = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.piece[this.fill++] = s < 0 ? s * 32768 : s * 32767;
        if (this.fill === CAPTURE_SAMPLES) {
          this.port.postMessage(this.piece.buffer, [this.piece.buffer]);
          this.piece = new Int16Array(CAPTURE_SAMPLES);
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

class PcmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // Float32Array pieces waiting to be played
    this.offset = 0; // samples of queue[0] already played
    this.itemPlayed = 0; // samples of the current answer played
    this.totalPlayed = 0; // samples played since the page started
    this.sinceReport = 0;
    this.port.onmessage = (event) => this.command(event.data);
  }

  command(message) {
    if (message.type === "push") {
      this.queue.push(message.samples);
    } else if (message.type === "start") { // a new answer begins
      this.itemPlayed = 0;
    } else if (message.type === "clear") { // barge-in: drop what is queued, say how much was heard
      const dropped = this.queue.reduce((n, piece) => n + piece.length, 0) - this.offset;
      this.queue = [];
      this.offset = 0;
      this.port.postMessage({ type: "cleared", played: this.itemPlayed, dropped: dropped, request: message.request });
    }
  }

  queued() {
    return this.queue.reduce((n, piece) => n + piece.length, 0) - this.offset;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + n), i);
      i += n;
      this.offset += n;
      this.itemPlayed += n;
      this.totalPlayed += n;
      if (this.offset === head.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, i);
    this.sinceReport += out.length;
    if (this.sinceReport >= 1200 || (i > 0 && this.queue.length === 0)) {
      this.port.postMessage({ type: "played", played: this.itemPlayed, total: this.totalPlayed, queued: this.queued() });
      this.sinceReport = 0;
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
registerProcessor("pcm-player", PcmPlayer);
