// The microphone's samples for /listen: mono (channels averaged), posted to the page every ~100 ms as
// float32 at the audio context's rate (the server resamples).
class ListenCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunk = new Float32Array(Math.round(sampleRate / 10));
    this.used = 0;
  }
  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) {
      const n = channels[0].length;
      for (let i = 0; i < n; i++) {
        let sum = 0;
        for (const c of channels) sum += c[i];
        this.chunk[this.used++] = sum / channels.length;
        if (this.used === this.chunk.length) {
          this.port.postMessage(this.chunk.slice(0));
          this.used = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("listen-capture", ListenCapture);
