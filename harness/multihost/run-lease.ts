// Which test-host resources (namespaces, links, processes, folders) one harness run owns: a state file per run
// under /run/securemesh-netns/, written before each resource is made, so that a run killed with SIGKILL is cleaned
// up by the next start, and two runs at once never remove each other's.
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, unlinkSync, writeSync } from "node:fs";
import { join } from "node:path";
import { procStat } from "../fixtures/proc.ts";

export const STATE_DIR = "/run/securemesh-netns";
/** Every namespace and link the harness makes starts with this (links: "smb", "smv"), so `ip netns list` shows whose they are. */
export const NAME_PREFIX = "smesh";
/** Slots number the runs that exist at once; each run's subnet and loopback block come from its slot. */
const MAX_SLOTS = 250;

interface ProcessRef {
  pid: number;
  /** The process's start time in clock ticks since boot (/proc/PID/stat field 22): a reused PID has another. */
  started: number;
}

export interface LeaseResources {
  namespaces: string[];
  links: string[];
  /** Process group leaders (started with `detached`): the whole group is killed. */
  groups: ProcessRef[];
  dirs: string[];
}

interface LeaseFile {
  slot: number;
  owner: ProcessRef;
  resources: LeaseResources;
}

/** The start time of a live process (field 22 of stat(5)), or undefined when there is none with that PID. */
function startTicks(pid: number): number | undefined {
  const fields = procStat(pid);
  return fields ? Number(fields[19]) : undefined;
}

const isAlive = (ref: ProcessRef) => startTicks(ref.pid) === ref.started;

export function processRef(pid: number): ProcessRef {
  return { pid, started: startTicks(pid) ?? -1 };
}

/** Runs `ip ARGS…` and returns its stdout; throws with ip's own error line when it fails. */
export function ip(args: readonly string[]): string {
  const result = Bun.spawnSync(["ip", ...args], { stdout: "pipe", stderr: "pipe" });
  if (result.exitCode !== 0) throw new Error(`ip ${args.join(" ")}: ${result.stderr.toString().trim() || `exit ${result.exitCode}`}`);
  return result.stdout.toString();
}

/** The PIDs of every process inside a namespace (none when it is gone). */
export function namespacePids(ns: string): number[] {
  const result = Bun.spawnSync(["ip", "netns", "pids", ns], { stdout: "pipe", stderr: "ignore" });
  return result.exitCode === 0 ? result.stdout.toString().split(/\s+/).filter(Boolean).map(Number) : [];
}

function killQuietly(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}

/**
 * Removes what a lease lists, synchronously (it runs in exit and signal handlers too): every process in its
 * namespaces and every process group it started is killed, then the namespaces, links and folders go.
 */
function removeResources(resources: LeaseResources): void {
  for (const ns of resources.namespaces) for (const pid of namespacePids(ns)) killQuietly(pid);
  for (const group of resources.groups) if (isAlive(group)) killQuietly(-group.pid);
  for (const ns of resources.namespaces) Bun.spawnSync(["ip", "netns", "del", ns], { stdout: "ignore", stderr: "ignore" });
  // A veth goes with its namespace only once the last process in it is gone; deleting our end removes the pair now.
  for (const link of resources.links) Bun.spawnSync(["ip", "link", "del", link], { stdout: "ignore", stderr: "ignore" });
  for (const dir of resources.dirs) rmSync(dir, { recursive: true, force: true });
}

const slotFile = (slot: number) => join(STATE_DIR, `run-${slot}.json`);

function readLease(file: string): LeaseFile | undefined {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as LeaseFile;
  } catch {
    return undefined; // half-written by a run killed mid-write, or removed meanwhile
  }
}

/** Removes the sets of runs whose owner is dead; returns one line per removed set. Runs still alive are left alone. */
export function cleanupStaleRuns(): string[] {
  if (!existsSync(STATE_DIR)) return [];
  const removed: string[] = [];
  for (const entry of readdirSync(STATE_DIR)) {
    if (!/^run-\d+\.json$/.test(entry)) continue;
    const file = join(STATE_DIR, entry);
    const lease = readLease(file);
    if (lease && isAlive(lease.owner)) continue;
    if (lease) removeResources(lease.resources);
    rmSync(file, { force: true });
    const r = lease?.resources;
    removed.push(
      `${entry} (owner PID ${lease?.owner.pid ?? "?"} is gone): ${r ? `${r.namespaces.length} namespaces, ${r.links.length} links, ${r.groups.length} process groups, ${r.dirs.length} folders` : "unreadable"}`,
    );
  }
  return removed;
}

const liveLeases = new Set<RunLease>();
const EXIT_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

function releaseAll(): void {
  for (const lease of liveLeases) lease.release();
}

function onSignal(signal: (typeof EXIT_SIGNALS)[number]): void {
  releaseAll();
  // Another listener (the harness's Ctrl+C handler) owns the exit; alone, exit as the signal would have.
  if (process.listenerCount(signal) === 1) process.exit(128 + ({ SIGHUP: 1, SIGINT: 2, SIGTERM: 15 } as const)[signal]);
}

let hooked = false;
function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on("exit", releaseAll);
  for (const signal of EXIT_SIGNALS) process.on(signal, () => onSignal(signal));
}

/**
 * One run's claim on a slot and the resources it made. Record a resource before making it; release() removes
 * them all, and runs by itself on exit, on SIGINT/SIGTERM/SIGHUP, and (through cleanupStaleRuns) at the next
 * start after a SIGKILL.
 */
export class RunLease {
  readonly slot: number;
  readonly #file: string;
  readonly #state: LeaseFile;
  #released = false;

  private constructor(slot: number, state: LeaseFile) {
    this.slot = slot;
    this.#file = slotFile(slot);
    this.#state = state;
  }

  /** Claims the lowest free slot, after removing the sets of dead runs. */
  static acquire(): RunLease {
    mkdirSync(STATE_DIR, { recursive: true });
    cleanupStaleRuns();
    for (let slot = 1; slot <= MAX_SLOTS; slot++) {
      const state: LeaseFile = { slot, owner: processRef(process.pid), resources: { namespaces: [], links: [], groups: [], dirs: [] } };
      let fd: number;
      try {
        fd = openSync(slotFile(slot), "wx"); // exclusive: two runs starting at once never get one slot
      } catch {
        continue;
      }
      writeSync(fd, JSON.stringify(state));
      closeSync(fd);
      const lease = new RunLease(slot, state);
      hookExit();
      liveLeases.add(lease);
      return lease;
    }
    throw new Error(`all ${MAX_SLOTS} test-network slots in ${STATE_DIR} are held by live runs`);
  }

  get resources(): Readonly<LeaseResources> {
    return this.#state.resources;
  }

  /** Notes a resource before it is made, so a crash right after making it still leaves a record. */
  record<K extends keyof LeaseResources>(kind: K, value: LeaseResources[K][number]): void {
    (this.#state.resources[kind] as LeaseResources[K][number][]).push(value);
    this.#save();
  }

  /** Forgets a resource that is gone (a process group that exited, say). */
  forget<K extends keyof LeaseResources>(kind: K, matches: (value: LeaseResources[K][number]) => boolean): void {
    const list = this.#state.resources[kind] as LeaseResources[K][number][];
    this.#state.resources[kind] = list.filter((v) => !matches(v)) as LeaseResources[K];
    this.#save();
  }

  #save(): void {
    if (this.#released) return;
    const temporary = `${this.#file}.${process.pid}.tmp`;
    const fd = openSync(temporary, "w");
    writeSync(fd, JSON.stringify(this.#state));
    closeSync(fd);
    renameSync(temporary, this.#file); // a reader sees the old state or the new, never half of one
  }

  /** Removes every resource and frees the slot; safe to call twice. */
  release(): void {
    if (this.#released) return;
    this.#released = true;
    liveLeases.delete(this);
    removeResources(this.#state.resources);
    try {
      unlinkSync(this.#file);
    } catch {
      // removed already by a stale-run cleanup that misjudged us, which only happens if /proc lies
    }
  }
}
