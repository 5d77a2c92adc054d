#!/usr/bin/env bash
# Regenerates the example clips in this folder with espeak-ng and sox (Debian: apt-get install espeak-ng sox).
#   question.wav  spoken question for the thinker ("What is the capital of France?"), ~2 s
#   voice.wav     reference voice to clone, ~3.6 s, a different espeak voice and pitch
#   voice.txt     exact transcript of voice.wav
# All clips: 24 kHz, mono, 16-bit PCM WAV (espeak-ng writes 22.05 kHz; sox resamples, -D: no dither, so reruns
# give identical files).
set -euo pipefail

cd "$(dirname "$0")"
for tool in espeak-ng sox; do
    command -v "$tool" >/dev/null || { echo "make_examples.sh: $tool is not installed" >&2; exit 1; }
done

QUESTION="What is the capital of France?"
VOICE_TEXT="Hi, I am Nova. I love to read books by the sea."

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

espeak-ng -v en-us -s 160 -p 45 -w "$tmp/question.wav" "$QUESTION"
espeak-ng -v en-gb+f3 -s 160 -p 70 -w "$tmp/voice.wav" "$VOICE_TEXT"

sox -D "$tmp/question.wav" -r 24000 -c 1 -b 16 question.wav
sox -D "$tmp/voice.wav" -r 24000 -c 1 -b 16 voice.wav
printf '%s\n' "$VOICE_TEXT" > voice.txt

for clip in question.wav voice.wav; do
    echo "$clip: $(soxi -r "$clip") Hz, $(soxi -c "$clip") channel(s), $(soxi -D "$clip") s"
done
