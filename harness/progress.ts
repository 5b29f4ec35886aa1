// Progress for long harness runs: a live status line on a TTY, plain lines (no escapes) elsewhere.

export interface ProgressOptions {
  /** Where lines go; a TTY gets a status line rewritten in place. */
  stream?: { isTTY?: boolean; write(text: string): unknown };
  now?: () => number;
  /** Least time between two redraws of the status line. */
  redrawMs?: number;
}

export class Progress {
  readonly #stream: NonNullable<ProgressOptions["stream"]>;
  readonly #now: () => number;
  readonly #redrawMs: number;
  readonly #started: number;
  #lastDraw = -Infinity;
  #statusShown = false;

  constructor(options: ProgressOptions = {}) {
    this.#stream = options.stream ?? process.stdout;
    this.#now = options.now ?? (() => performance.now());
    this.#redrawMs = options.redrawMs ?? 100;
    this.#started = this.#now();
  }

  get tty(): boolean {
    return Boolean(this.#stream.isTTY);
  }

  /** "12.3 s" since this Progress began. */
  elapsed(): string {
    return `${((this.#now() - this.#started) / 1000).toFixed(1)} s`;
  }

  /**
   * The live status (counts, rates): redrawn in place on a TTY, at most every redrawMs; nothing off a TTY. Callers
   * in a load loop pass a function, so the text is only built when it is drawn.
   */
  status(text: string | (() => string)): void {
    if (!this.tty) return;
    const now = this.#now();
    if (now - this.#lastDraw < this.#redrawMs) return;
    this.#lastDraw = now;
    this.#stream.write(`\r\x1b[2K${typeof text === "function" ? text() : text} · ${this.elapsed()}`);
    this.#statusShown = true;
  }

  /** A lasting line: clears the status line first on a TTY; off a TTY it is the only output. */
  line(text: string): void {
    this.clear();
    this.#stream.write(`${text}\n`);
  }

  clear(): void {
    if (this.#statusShown) this.#stream.write("\r\x1b[2K");
    this.#statusShown = false;
    this.#lastDraw = -Infinity;
  }
}
