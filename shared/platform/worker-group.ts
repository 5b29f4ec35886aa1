// N copies of the running role as child processes sharing its listening port (SO_REUSEPORT), so one role can use
// every core, as nginx's workers do: the kernel spreads new connections over them, and each worker is a whole role
// with its own upstream pool. The supervisor restarts a worker that dies and passes signals on.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, renameSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError } from "./errors.ts";

/** What a worker tells its supervisor once it listens: written to the file named by WORKER_STATE_ENV. */
export interface WorkerState {
  pid: number;
  /** The port it listens on: the supervisor starts the other workers on the first one's port (it may ask for 0). */
  port: number;
  /** Its own admin listener (loopback), which the supervisor's status page and /metrics read. */
  adminUrl: string | null;
}

/** A worker finds these in its environment: its number (1…N) and where to write its WorkerState. */
export const WORKER_INDEX_ENV = "SECUREMESH_WORKER";
export const WORKER_STATE_ENV = "SECUREMESH_WORKER_STATE";
/** Set for every worker but the first start of worker 1, which binds the port alone and so checks it is free. */
export const WORKER_SHARES_PORT_ENV = "SECUREMESH_WORKER_SHARES_PORT";

/** The worker number this process runs as, or null for a role started on its own (or as the supervisor). */
export function workerIndex(): number | null {
  const value = process.env[WORKER_INDEX_ENV];
  return value && /^[1-9][0-9]*$/.test(value) ? Number(value) : null;
}

/** Whether this worker joins a port its siblings already hold. */
export function workerSharesPort(): boolean {
  return process.env[WORKER_SHARES_PORT_ENV] === "1";
}

/**
 * Called by a worker once it listens. Written to a temporary name and renamed, so the supervisor never reads half a
 * file. A worker also exits when its supervisor is gone (re-parented), so a kill -9 of the supervisor leaves no
 * worker serving on its own.
 */
export function reportWorkerReady(state: Omit<WorkerState, "pid">, onOrphaned: () => void): void {
  const file = process.env[WORKER_STATE_ENV];
  if (!file) return;
  writeFileSync(`${file}.tmp`, JSON.stringify({ pid: process.pid, ...state }));
  renameSync(`${file}.tmp`, file);
  const supervisor = process.ppid;
  setInterval(() => {
    if (process.ppid !== supervisor) onOrphaned();
  }, 500).unref();
}

export interface WorkerGroupOptions {
  count: number;
  /** The role's own arguments, given to every worker; the port is replaced by the first worker's bound port. */
  args: (port: number) => string[];
  port: number;
  /** How long a worker may take to start listening. */
  startTimeoutMs?: number;
  onEvent: (message: string) => void;
}

interface Worker {
  index: number;
  child: ChildProcess;
  state: WorkerState | null;
  exited: Promise<number | null>;
}

/**
 * Starts worker 1 on the requested port and, once it listens, workers 2…N on the port it got. Throws ConfigError
 * when the first worker cannot start (its own error is on the shared stderr).
 */
export class WorkerGroup {
  readonly #options: WorkerGroupOptions;
  readonly #dir = mkdtempSync(join(tmpdir(), "securemesh-workers-"));
  readonly #workers = new Map<number, Worker>();
  #port = 0;
  #stopping = false;

  private constructor(options: WorkerGroupOptions) {
    this.#options = options;
  }

  static async start(options: WorkerGroupOptions): Promise<WorkerGroup> {
    const group = new WorkerGroup(options);
    try {
      const first = await group.#startWorker(1, options.port);
      group.#port = first.port;
      await Promise.all(Array.from({ length: options.count - 1 }, (_, i) => group.#startWorker(i + 2, first.port)));
    } catch (error) {
      await group.stop();
      throw error;
    }
    return group;
  }

  get port(): number {
    return this.#port;
  }

  /** The workers that are listening now, with their numbers (which stay with a worker's place across restarts). */
  states(): (WorkerState & { index: number })[] {
    return [...this.#workers.values()].flatMap((w) => (w.state ? [{ ...w.state, index: w.index }] : []));
  }

  /** Passes a signal on to every worker (SIGHUP: reload certificates and policy). */
  signal(signal: NodeJS.Signals): void {
    for (const w of this.#workers.values()) w.child.kill(signal);
  }

  async stop(): Promise<void> {
    this.#stopping = true;
    const workers = [...this.#workers.values()];
    for (const w of workers) w.child.kill("SIGTERM");
    const stopped = await Promise.race([
      Promise.all(workers.map((w) => w.exited)).then(() => true),
      new Promise<false>((resolve) => setTimeout(() => resolve(false), 5000).unref()),
    ]);
    if (!stopped) for (const w of workers) w.child.kill("SIGKILL");
    rmSync(this.#dir, { recursive: true, force: true });
  }

  async #startWorker(index: number, port: number): Promise<WorkerState> {
    const stateFile = join(this.#dir, `worker-${index}.json`);
    rmSync(stateFile, { force: true });
    // Worker logs go straight to the supervisor's stdout and stderr: no copy through this process per line.
    const child = spawn(process.execPath, [...runtimeArgs(), ...this.#options.args(port)], {
      stdio: ["ignore", "inherit", "inherit"],
      // It joins the port only while a sibling holds it; alone (the first start, or every worker gone) it binds the
      // port as a role on its own does, checking nothing else holds it (found by attack on #14: a restart joined a
      // foreign SO_REUSEPORT listener that took the port while every worker was down).
      env: {
        ...process.env,
        [WORKER_INDEX_ENV]: String(index),
        [WORKER_STATE_ENV]: stateFile,
        [WORKER_SHARES_PORT_ENV]: this.states().some((w) => w.index !== index) ? "1" : "0",
      },
    });
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    const worker: Worker = { index, child, state: null, exited };
    this.#workers.set(index, worker);
    void exited.then((code) => this.#onExit(worker, code));
    let gone = false;
    void exited.then(() => (gone = true));
    const state = await pollUntil(
      `worker ${index} to listen`,
      () => {
        if (gone) throw new ConfigError(`worker ${index} exited before it listened`);
        try {
          return JSON.parse(readFileSync(stateFile, "utf8")) as WorkerState;
        } catch {
          return undefined;
        }
      },
      this.#options.startTimeoutMs ?? 15_000,
    );
    worker.state = state;
    return state;
  }

  #onExit(worker: Worker, code: number | null): void {
    if (this.#workers.get(worker.index) !== worker) return;
    // One that never listened is #startWorker's failure to handle (start() gives up, a restart tries again).
    const wasListening = worker.state !== null;
    worker.state = null;
    if (this.#stopping || !wasListening) return;
    // A worker that dies is replaced: its connections are lost, the others' are not, and the port stays served.
    this.#options.onEvent(`worker ${worker.index} (pid ${worker.child.pid}) exited (${code ?? "signal"}); starting a new one`);
    const restart = () => {
      if (this.#stopping) return;
      this.#startWorker(worker.index, this.#port).then(
        (state) => this.#options.onEvent(`worker ${worker.index} is back (pid ${state.pid})`),
        () => setTimeout(restart, 1000).unref(), // it could not start yet (say, its certificate is being renewed)
      );
    };
    restart();
  }
}

/** Polls `check` (every 20 ms, a worker starts in about 100) until it gives a value, throws, or time runs out. */
async function pollUntil<T>(what: string, check: () => T | undefined, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new ConfigError(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** How to run the role's script again on this runtime: Bun takes the script as is. */
function runtimeArgs(): string[] {
  const script = process.argv[1];
  if (!script) throw new ConfigError("cannot tell which script to run as a worker");
  return [script];
}
