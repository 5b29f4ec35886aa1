// Starts real role processes, tees their logs to files, waits for readiness by health checks, and stops them all.
import { createWriteStream, existsSync, mkdirSync, readdirSync, type WriteStream } from "node:fs";
import { join } from "node:path";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { createLogger } from "../shared/ops/log.ts";
import { FernetKeys } from "../shared/request-path/fernet-reload.ts";
import { MeshClient } from "../shared/request-path/mesh-client.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";

export class ExpectationFailed extends Error {}

/** Fails the scenario with what was seen. */
export function expectThat(condition: unknown, message: string): asserts condition {
  if (!condition) throw new ExpectationFailed(message);
}

/** Polls `check` until it returns a value other than undefined/false, or fails after `timeoutMs` naming `what`. */
export async function waitFor<T>(what: string, check: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let delay = 20;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value as T;
    if (Date.now() > deadline) throw new ExpectationFailed(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await Bun.sleep(delay); // a poll interval between checks of a condition, not a wait for time to pass
    delay = Math.min(delay * 2, 200);
  }
}

export class RoleProcess {
  readonly lines: string[] = [];
  /** Resolves once stdout and stderr are read to the end and written to the log file. */
  readonly drained: Promise<void>;
  #waiters: { pattern: RegExp; resolve: (line: string) => void }[] = [];
  #exited = false;

  constructor(
    readonly name: string,
    readonly proc: Bun.Subprocess<"ignore", "pipe", "pipe">,
    readonly logFile: string,
    log: WriteStream,
  ) {
    this.drained = Promise.all([this.#pump(proc.stdout, log), this.#pump(proc.stderr, log)]).then(() => {
      log.end();
    });
    void proc.exited.then(() => {
      this.#exited = true;
    });
  }

  async #pump(stream: ReadableStream<Uint8Array>, log: WriteStream): Promise<void> {
    const decoder = new TextDecoder();
    let partial = "";
    for await (const chunk of stream) {
      log.write(chunk);
      partial += decoder.decode(chunk, { stream: true });
      const parts = partial.split("\n");
      partial = parts.pop()!;
      for (const line of parts) this.#line(line);
    }
    if (partial) this.#line(partial);
  }

  #line(line: string): void {
    this.lines.push(line);
    this.#waiters = this.#waiters.filter((w) => {
      if (!w.pattern.test(line)) return true;
      w.resolve(line);
      return false;
    });
  }

  get running(): boolean {
    return !this.#exited;
  }

  /** Resolves with the first log line (past or future) matching `pattern`; fails if the process exits first. */
  waitForLine(pattern: RegExp, timeoutMs = 15_000): Promise<string> {
    const seen = this.lines.find((l) => pattern.test(l));
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new ExpectationFailed(`${this.name}: no log line matching ${pattern} within ${timeoutMs} ms; last lines:\n${this.tail()}`)),
        timeoutMs,
      );
      this.#waiters.push({
        pattern,
        resolve: (line) => {
          clearTimeout(timer);
          resolve(line);
        },
      });
      void this.proc.exited.then((code) => {
        clearTimeout(timer);
        reject(new ExpectationFailed(`${this.name} exited (${code}) before logging ${pattern}; last lines:\n${this.tail()}`));
      });
    });
  }

  tail(n = 8): string {
    return this.lines
      .slice(-n)
      .map((l) => `    ${l}`)
      .join("\n");
  }

  signal(signal: NodeJS.Signals): void {
    if (this.running) this.proc.kill(signal);
  }
}

/**
 * Every process any cluster started and that has not exited. A test that times out never reaches its `await using`
 * disposal, and a harness run can die on an uncaught error: neither may leave a role holding a port, so whatever is
 * still running when this process exits is killed.
 */
const liveProcesses = new Set<Bun.Subprocess>();
process.once("exit", () => {
  for (const proc of liveProcesses) proc.kill("SIGKILL");
});

/** Which runtime runs the roles a cluster starts; `mixed` alternates, starting with Deno. */
export type RoleRuntime = "bun" | "deno" | "mixed";
export const ROLE_RUNTIMES: readonly RoleRuntime[] = ["bun", "deno", "mixed"];

/**
 * Deno from the npm registry, pinned in devDependencies like Bun: the binary itself, from its platform package.
 * node_modules/.bin/deno is a Node wrapper that spawns it, so a signal (a kill, a SIGSTOP) would miss the role.
 */
export function denoBinary(): string {
  const platforms = join(REPO_ROOT, "node_modules", "@deno");
  const found = existsSync(platforms)
    ? readdirSync(platforms)
        .map((p) => join(platforms, p, "deno"))
        .find((p) => existsSync(p))
    : undefined;
  if (!found) throw new ExpectationFailed("no Deno binary under node_modules/@deno: run npm ci (deno is in devDependencies)");
  return found;
}

/** The command that runs roles/<script>.ts with `args` on `runtime`: this Bun, or Deno with every permission. */
export function roleCommand(runtime: "bun" | "deno", script: string, args: readonly string[]): string[] {
  const path = join(REPO_ROOT, "roles", `${script}.ts`);
  return runtime === "deno" ? [denoBinary(), "run", "-A", path, ...args] : [process.execPath, path, ...args];
}

export interface ClusterOptions {
  /** Default bun. The harness itself always runs on Bun. */
  runtime?: RoleRuntime;
  logDir: string;
  pki: string;
  /** Extra environment for every role, e.g. DATABASE_URL. */
  env?: Record<string, string>;
}

export interface ClientRun {
  exitCode: number;
  lines: string[];
}

/**
 * A set of role processes for one scenario or test. Use with `await using`, or call stop(): every process it
 * started is killed, also when the scenario throws.
 */
export class Cluster implements AsyncDisposable {
  readonly roles = new Map<string, RoleProcess>();
  /** Every log this cluster wrote, in the order first started; kept after stop() for screenshots. */
  readonly launched: { name: string; logFile: string; port?: number }[] = [];
  readonly #options: ClusterOptions;
  readonly #probeTls: ReturnType<typeof mutualTlsClientOptions>;
  /** health() asks as the coordinator, which the policy grants status.read: a server's /health then has its detail. */
  #statusTls: ReturnType<typeof mutualTlsClientOptions> | undefined;

  constructor(options: ClusterOptions) {
    this.#options = options;
    mkdirSync(options.logDir, { recursive: true });
    this.#probeTls = mutualTlsClientOptions(loadIdentity(options.pki, "client1"));
  }

  /** Adds to the environment of every role started from now on (a scenario's own policy file, say). */
  addEnv(env: Record<string, string>): void {
    this.#options.env = { ...this.#options.env, ...env };
  }

  /**
   * Starts `bun roles/<script>.ts args`, or `deno run -A …`, with the cluster's PKI and environment, teeing its output
   * to <logDir>/<name>.log. With `mixed`, roles alternate, Deno first: server 1 on Deno, server 2 on Bun, a
   * coordinator on Deno, and so on. A role restarted under the same name keeps its runtime.
   */
  #launch(name: string, script: string, args: string[], options: { env?: Record<string, string>; stdin?: string } = {}): RoleProcess {
    const command = roleCommand(this.runtimeOf(name), script, args);
    // HARNESS_CPU_PROFILE=<role name> (say coordinator-1w in the bench) writes that role's Bun CPU profile beside its
    // log when it exits: the roles' own guard refuses --cpu-prof from the environment, not from the command line.
    if (process.env.HARNESS_CPU_PROFILE === name && command[0] === process.execPath)
      command.splice(1, 0, "--cpu-prof", `--cpu-prof-dir=${this.#options.logDir}`);
    return this.#launchCommand(name, command, options);
  }

  readonly #runtimes = new Map<string, "bun" | "deno">();

  /** Runs the role of this name on `runtime`, whatever the cluster's choice (the bench runs both side by side). */
  pinRuntime(name: string, runtime: "bun" | "deno"): void {
    this.#runtimes.set(name, runtime);
  }

  /** The runtime a role of this name runs on (decided at its first start). */
  runtimeOf(name: string): "bun" | "deno" {
    let runtime = this.#runtimes.get(name);
    if (!runtime) {
      const chosen = this.#options.runtime ?? "bun";
      runtime = chosen === "mixed" ? (this.#runtimes.size % 2 === 0 ? "deno" : "bun") : chosen;
      this.#runtimes.set(name, runtime);
    }
    return runtime;
  }

  #launchCommand(name: string, argv: string[], options: { env?: Record<string, string>; stdin?: string } = {}): RoleProcess {
    const logFile = join(this.#options.logDir, `${name}.log`);
    if (!this.launched.some((l) => l.name === name)) this.launched.push({ name, logFile });
    const proc = Bun.spawn(argv, {
      cwd: REPO_ROOT,
      env: { ...process.env, PKI_DIR: this.#options.pki, ...this.#options.env, ...options.env },
      stdin: options.stdin === undefined ? "ignore" : new TextEncoder().encode(options.stdin),
      stdout: "pipe",
      stderr: "pipe",
    });
    liveProcesses.add(proc);
    void proc.exited.then(() => liveProcesses.delete(proc));
    return new RoleProcess(name, proc as Bun.Subprocess<"ignore", "pipe", "pipe">, logFile, createWriteStream(logFile, { flags: "a" }));
  }

  /** Spawns a long-running role; returns once it logs the port it listens on. */
  async spawn(name: string, script: string, args: string[], env: Record<string, string> = {}): Promise<{ role: RoleProcess; port: number }> {
    const role = this.#launch(name, script, args, { env });
    this.roles.set(name, role);
    const listening = /listening on https:\/\/[^ ]+:(\d+)/;
    const ready = await role.waitForLine(listening);
    const port = Number(listening.exec(ready)![1]);
    this.launched.find((l) => l.name === name)!.port = port;
    return { role, port };
  }

  /** A process that is not a role (HAProxy, say), logged and stopped with the rest. */
  startCommand(name: string, argv: string[]): RoleProcess {
    const role = this.#launchCommand(name, argv);
    this.roles.set(name, role);
    return role;
  }

  async startServer(name: string, port: number, args: string[] = []): Promise<string> {
    const { port: bound } = await this.spawn(name, "server", [String(port), ...args]);
    const url = `https://127.0.0.1:${bound}`;
    await this.waitHealthy(url);
    return url;
  }

  /** Spawns a role and waits until its /health answers 200 over mutual TLS. */
  async startRole(name: string, script: string, args: string[], env: Record<string, string> = {}): Promise<string> {
    const { port } = await this.spawn(name, script, args, env);
    const url = `https://127.0.0.1:${port}`;
    await this.waitHealthy(url);
    return url;
  }

  /** A coordinator forwarding to `servers`, or, given a path, to the servers its --servers-file lists. */
  async startCoordinator(name: string, port: number, servers: string[] | { file: string }, args: string[] = []): Promise<string> {
    const membership = Array.isArray(servers) ? ["--servers", servers.join(",")] : ["--servers-file", servers.file];
    const { port: bound } = await this.spawn(name, "coordinator", [String(port), ...membership, ...args]);
    const url = `https://127.0.0.1:${bound}`;
    await this.waitHealthy(url);
    return url;
  }

  /** The admin URL a coordinator started with --admin-port logged, e.g. http://127.0.0.1:41234 */
  async adminUrl(name: string): Promise<string> {
    const line = await this.role(name).waitForLine(/admin .* on http:\/\/\S+\//);
    return /(http:\/\/\S+?)\/?$/.exec(line)![1]!;
  }

  /**
   * Status and body of GET <url>/health over mutual TLS as the coordinator (a PKI without one: as client1), or
   * undefined while it cannot be reached.
   */
  async health(url: string): Promise<{ status: number; body: Record<string, unknown> } | undefined> {
    this.#statusTls ??= existsSync(join(this.#options.pki, "coordinator_cert.pem"))
      ? mutualTlsClientOptions(loadIdentity(this.#options.pki, "coordinator"))
      : this.#probeTls;
    try {
      const response = await fetch(`${url}/health`, { tls: this.#statusTls, signal: AbortSignal.timeout(2000) });
      return { status: response.status, body: (await response.json()) as Record<string, unknown> };
    } catch {
      return undefined;
    }
  }

  /** fetch over mutual TLS as client1. */
  request(url: string, init: RequestInit = {}): Promise<Response> {
    return fetch(url, { ...init, tls: this.#probeTls, signal: AbortSignal.timeout(10_000) });
  }

  waitHealthy(url: string, timeoutMs?: number): Promise<unknown> {
    return waitFor(`${url}/health to answer 200`, async () => (await this.health(url))?.status === 200, timeoutMs);
  }

  /** Runs roles/<script>.ts to completion on the cluster's runtime, its output logged to <logDir>/<logName>.log. */
  async run(logName: string, script: string, args: string[], options: { stdin?: string; env?: Record<string, string> } = {}): Promise<ClientRun> {
    const role = this.#launch(logName, script, args, options);
    const exitCode = await role.proc.exited;
    await role.drained;
    return { exitCode, lines: role.lines };
  }

  runClient(logName: string, args: string[]): Promise<ClientRun> {
    return this.run(logName, "client", args);
  }

  /**
   * A client of the named identity that talks to the cluster in-process, through the same module the client role
   * uses. `direct` talks to servers themselves, as the coordinator would forward to them: over the coordinator's
   * certificate (the servers decide `forward` on the connection's), expecting a server's. Its Fernet keys follow the
   * PKI's encryption_key.txt, as a long-lived application's would; close() stops that.
   */
  client(name: string, coordinators: string[], options: { direct?: boolean } = {}): MeshClient {
    const pki = this.#options.pki;
    return new MeshClient({
      identity: loadIdentity(pki, name),
      fernet: FernetKeys.open(pki).watch(createLogger(name)),
      coordinators,
      ...(options.direct ? { tlsIdentity: loadIdentity(pki, "coordinator"), expect: "spiffe://securemesh/server/*" } : {}),
    });
  }

  get pki(): string {
    return this.#options.pki;
  }

  get logDir(): string {
    return this.#options.logDir;
  }

  role(name: string): RoleProcess {
    const role = this.roles.get(name);
    if (!role) throw new Error(`no role named ${name}`);
    return role;
  }

  /** SIGKILLs a role and waits until it is gone. */
  async kill(name: string): Promise<void> {
    const role = this.role(name);
    role.signal("SIGKILL");
    await role.proc.exited;
  }

  /** Stops the named roles, or every role; SIGTERM first, SIGKILL for one that has not gone within 3 s. */
  async stop(names: readonly string[] = [...this.roles.keys()]): Promise<void> {
    await Promise.all(
      names.map(async (name) => {
        const role = this.roles.get(name);
        if (!role) return;
        role.signal("SIGCONT"); // a stopped process cannot act on SIGTERM
        role.signal("SIGTERM");
        const timer = setTimeout(() => role.signal("SIGKILL"), 3000);
        await role.proc.exited;
        clearTimeout(timer);
        this.roles.delete(name);
      }),
    );
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}
