// Re-encryption of stored records after a Fernet key rotation (MultiFernet's rotate, done by the servers themselves).
//
// Servers store each record's token as the client sent it, so a key that leaves the file would take every record
// still under it along (issue 23: no command may lose data). While a server holds old keys (decrypt-only keys of the
// file other than one added and not yet promoted, and keys kept after leaving it: fernet-reload.ts), it walks the
// records in the background and moves each one under an old key to the primary:
//
//   count          a walk over the records, MAC checks only, tallying records by key. Nothing old: done, until the
//                  next walk REWRAP_REST_MS later, which only looks at records written since. A server with no old
//                  key counts once at start, a page every REWRAP_REST_MS, and so reports records under no key it
//                  holds (a key retired before it ever held it, or kept in a state folder since lost).
//   re-encrypt     a walk over the ids where the count found old records: each is rotated (same message, same
//                  timestamp, the primary's key) and written back by compare-and-set (RecordStore.replaceTokens), so
//                  several servers on one database may do this at once: the first write wins, the others match no row.
//
// Each page is one bounded batch (REWRAP_BATCH records) on a timer (REWRAP_INTERVAL_MS between pages), so requests
// are never queued behind it, and the keys in force are read per page: a reload restarts the walk, never mixes sets.
// The counts answer fernet-reload.ts's question, "do stored records still use this key?", and /health's
// `fernet_rewrap`; a kept key is dropped once a count (or a re-encryption walk) finds no record under it.
import type { Logger } from "../ops/log.ts";
import { fernetKeyFingerprint } from "../platform/fernet-key-file.ts";
import type { FernetKeys } from "./fernet-reload.ts";
import type { RecordStore, TokenChange } from "./store.ts";

/** Records a page: a count reads this many ids and tokens; a re-encryption rotates and writes at most this many. */
export const REWRAP_BATCH = 500;
/** Between two pages of a walk. With REWRAP_BATCH, at most 5,000 records a second a server. */
export const REWRAP_INTERVAL_MS = 100;
/** Between walks once nothing old is left: how soon a record written under an old key (a client slow to reload) moves. */
export const REWRAP_REST_MS = 1000;
/**
 * How far below the highest id seen a walk of the newer records starts again. Ids are handed out at insert and
 * rows become visible at commit, so on MySQL a row may appear below one seen already; a walk that starts this far
 * back finds it.
 */
export const REWRAP_OVERLAP_IDS = 1000;

export type RewrapState = "idle" | "counting" | "re-encrypting" | "watching" | "paused";

/** /health's `fernet_rewrap`. */
export interface RewrapStatus {
  /**
   * idle: no old key held, nothing to do (after one count at start). counting, re-encrypting: a walk is under way.
   * watching: old keys held, no record under them at the last walk; newer records are checked every REWRAP_REST_MS.
   * paused: the store failed.
   */
  state: RewrapState;
  /** Records under an old key, from the last count less those moved since; null until a count after a key change. */
  pending: number | null;
  /** The same, by old key (fingerprint). */
  by_key: Record<string, number>;
  /** Records this server re-encrypted since it started. */
  rewrapped: number;
  /** Records under no key this server holds, at the last full count (null before one): not readable until their key is put back. */
  unreadable: number | null;
  /** Keys gone from the key file, kept (in memory and in the state folder) until no record uses them. */
  kept: string[];
}

export interface RewrapOptions {
  store: RecordStore;
  keys: FernetKeys;
  logger: Logger;
  batch?: number;
  intervalMs?: number;
  restMs?: number;
}

interface Walk {
  phase: "counting" | "re-encrypting";
  /** Every record (after a key change), or those above `newerThan` and the overlap. */
  full: boolean;
  /** The walk reads ids above this. */
  cursor: number;
  /** A walk of the newer records counts (for the totals) only ids above this; the overlap below is checked for old keys. */
  newerThan: number;
  counts: Map<string, number>;
  unreadable: number;
  /** Ids of the first and last record the count found under an old key. */
  firstOld: number;
  lastOld: number;
  /** Re-encryption: the records it looked at that are still under an old key (a write lost to a change it did not make). */
  left: Map<string, number>;
  started: number;
  moved: number;
  /** Walks are numbered as they begin: a kept key is released only by a count begun after it was kept. */
  serial: number;
}

const add = (map: Map<string, number>, key: string, n = 1) => map.set(key, (map.get(key) ?? 0) + n);

/**
 * Moves stored records from old Fernet keys to the primary, and tells FernetKeys which keys records still use.
 * @example const rewrap = new FernetRewrap({ store, keys, logger }).start(); … rewrap.status(); await rewrap.stop();
 */
export class FernetRewrap {
  readonly #store: RecordStore;
  readonly #keys: FernetKeys;
  readonly #logger: Logger;
  readonly #batch: number;
  readonly #intervalMs: number;
  readonly #restMs: number;

  /** Records per key (fingerprint), from the last count and kept current by re-encryption; null: not counted since the primary changed. */
  #counts: Map<string, number> | null = null;
  #unreadable: number | null = null;
  #reportedUnreadable = 0;
  /** The highest id a finished walk saw: the next walk of newer records starts near it. */
  #seen = 0;
  #walk: Walk | null = null;
  /** Set by a key change: the walk under way is dropped and a full one begins. */
  #restart = true;
  #primary: string;
  #old: Set<string>;
  #rewrapped = 0;
  /** Records this server moved off each key, for the line that drops a kept one. */
  readonly #movedFrom = new Map<string, number>();
  /** A server begins with a count (start()). */
  #state: RewrapState = "counting";
  #timer: ReturnType<typeof setTimeout> | null = null;
  #tick: Promise<void> | null = null;
  #stopped = true;
  #failing = false;
  /** The one count a server makes at start, old keys or not, is done. */
  #countedAtStart = false;
  #walks = 0;
  /** For each kept key, the first walk that began after it was kept: only such a walk's count may release it. */
  readonly #keptBefore = new Map<string, number>();
  /**
   * Records whose MAC checks under a key held but whose message does not decrypt (a broken token): counted as
   * unreadable, never moved again. A client made with Fernet never sends one; kept so that one cannot keep a walk going.
   */
  readonly #broken = new Set<number>();

  constructor(options: RewrapOptions) {
    this.#store = options.store;
    this.#keys = options.keys;
    this.#logger = options.logger;
    this.#batch = options.batch ?? REWRAP_BATCH;
    this.#intervalMs = options.intervalMs ?? REWRAP_INTERVAL_MS;
    this.#restMs = options.restMs ?? REWRAP_REST_MS;
    this.#primary = options.keys.fingerprints[0]!;
    this.#old = options.keys.rewrappable;
    // Keys kept from before a restart (FernetKeys.keepOnDisk): the first walk's count may release them.
    for (const key of options.keys.kept) this.#keptBefore.set(key, 1);
    options.keys.keepWhileUsed(
      (key) => this.usage(key),
      () => this.#keysChanged(),
    );
  }

  /** Begins walking (at once if old keys are held); returns this. */
  start(): this {
    this.#stopped = false;
    this.#schedule(0);
    return this;
  }

  /** Stops walking; resolves once a page under way has finished, so the store can be closed after it. */
  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    await this.#tick;
  }

  /**
   * How many stored records `key` opens, as far as this server knows: null for the primary (records keep arriving
   * under it) and whenever no count has finished since the primary changed; otherwise the last count, less the
   * records moved off it since.
   */
  usage(key: string): number | null {
    const fingerprint = fernetKeyFingerprint(key);
    if (fingerprint === this.#keys.fingerprints[0] || this.#counts === null) return null;
    return (this.#counts.get(fingerprint) ?? 0) + (this.#walk?.left.get(fingerprint) ?? 0);
  }

  status(): RewrapStatus {
    const old = this.#keys.rewrappable;
    const byKey: Record<string, number> = {};
    for (const fingerprint of old) {
      const n = this.#counts === null ? null : (this.#counts.get(fingerprint) ?? 0) + (this.#walk?.left.get(fingerprint) ?? 0);
      if (n !== null) byKey[fingerprint] = n;
    }
    const idle = old.size === 0;
    return {
      state: this.#state,
      pending: idle ? 0 : this.#counts === null ? null : Object.values(byKey).reduce((a, b) => a + b, 0),
      by_key: byKey,
      rewrapped: this.#rewrapped,
      unreadable: this.#unreadable,
      kept: this.#keys.kept,
    };
  }

  /**
   * A reload or a release. Counts by key hold across it, except that records kept arriving under the old primary
   * while it encrypted: a new primary means a recount before anyone relies on them. A new old key (the demoted
   * primary, a key kept) means a new walk; a key gone (released, retired unused) or added for later does not.
   */
  #keysChanged(): void {
    const primary = this.#keys.fingerprints[0]!;
    const old = this.#keys.rewrappable;
    if (primary !== this.#primary) this.#counts = null;
    if (primary !== this.#primary || [...old].some((key) => !this.#old.has(key))) this.#restart = true;
    for (const key of this.#keys.kept) if (!this.#keptBefore.has(key)) this.#keptBefore.set(key, this.#walks + 1);
    for (const key of this.#keptBefore.keys()) if (!this.#keys.kept.includes(key)) this.#keptBefore.delete(key);
    this.#primary = primary;
    this.#old = old;
    if (this.#restart && !this.#stopped && !this.#tick) this.#schedule(0);
  }

  #schedule(delayMs: number): void {
    if (this.#stopped) return;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.#tick = this.#page().finally(() => {
        this.#tick = null;
      });
    }, delayMs);
    // Background work: it never keeps a process alive by itself (Bun's and Node's timers; Deno's node:timers too).
    (this.#timer as { unref?: () => void }).unref?.();
  }

  /** One page of the walk, then the timer for the next. Never throws: a store failure pauses the walk and retries. */
  async #page(): Promise<void> {
    let next = this.#intervalMs;
    try {
      if (this.#restart || !this.#walk) next = this.#begin();
      else if (this.#walk.phase === "counting") next = await this.#countPage(this.#walk);
      else next = await this.#rewrapPage(this.#walk);
      if (this.#failing) this.#logger.info("Fernet re-encryption resumed: the record store answers again");
      this.#failing = false;
    } catch (error) {
      if (!this.#failing) this.#logger.warn(`Fernet re-encryption paused, retrying every ${this.#restMs} ms: ${(error as Error).message}`);
      this.#failing = true;
      this.#state = "paused";
      next = this.#restMs;
    }
    this.#schedule(next);
  }

  /** Starts a walk if old keys are held (a full one after a key change); returns the delay to the next page. */
  #begin(): number {
    const full = this.#restart || this.#counts === null;
    this.#restart = false;
    // A walk dropped mid re-encryption: what it saw left under old keys goes back into the counts.
    if (this.#walk && this.#counts) for (const [key, n] of this.#walk.left) add(this.#counts, key, n);
    if (this.#keys.rewrappable.size === 0 && this.#countedAtStart) {
      // Nothing old: no walk. A count made now would go stale unseen, so the next key to leave the file is kept until counted.
      this.#walk = null;
      this.#counts = null;
      this.#state = "idle";
      return this.#restMs;
    }
    // With old keys, a walk; without, one count at start all the same: a server restarted after its file lost a key
    // that records still need says how many it cannot read, rather than nothing.
    const cursor = full ? 0 : Math.max(0, this.#seen - REWRAP_OVERLAP_IDS);
    this.#walk = {
      phase: "counting",
      full,
      cursor,
      newerThan: full ? 0 : this.#seen,
      counts: new Map(),
      unreadable: 0,
      firstOld: Infinity,
      lastOld: 0,
      left: new Map(),
      started: performance.now(),
      moved: 0,
      serial: ++this.#walks,
    };
    // A look at the newer records, every REWRAP_REST_MS, is what watching is.
    this.#state = full ? "counting" : "watching";
    return 0;
  }

  /** Which key a token is under, by fingerprint (null: none held), and whether that key is an old one. */
  #classify(token: string, old: Set<string>): { key: string | null; old: boolean } {
    const index = this.#keys.records.keyIndex(token);
    const key = index < 0 ? null : (this.#keys.recordFingerprints[index] ?? null);
    return { key, old: key !== null && old.has(key) };
  }

  async #countPage(walk: Walk): Promise<number> {
    const rows = await this.#store.tokensAfter(walk.cursor, this.#batch);
    if (this.#restart) return 0;
    const old = this.#keys.rewrappable;
    for (const { id, token } of rows) {
      walk.cursor = id;
      if (this.#broken.has(id)) {
        if (id > walk.newerThan) walk.unreadable += 1;
        continue;
      }
      const { key, old: isOld } = this.#classify(token, old);
      // Below newerThan (the overlap): counted before, unless under an old key, which the last walk left at none.
      if (id > walk.newerThan || isOld) {
        if (key === null) walk.unreadable += 1;
        else add(walk.counts, key);
      }
      if (isOld) {
        walk.firstOld = Math.min(walk.firstOld, id);
        walk.lastOld = Math.max(walk.lastOld, id);
      }
    }
    // The count at start with no old key is a census with nothing to move: one page each REWRAP_REST_MS, a tenth of
    // the pace, so a server that has just started on a big store reads it slowly (1M records: about half an hour).
    if (rows.length === this.#batch) return old.size === 0 ? this.#restMs : this.#intervalMs;
    this.#finishCount(walk, old);
    return walk.phase === "counting" ? this.#restMs : this.#intervalMs;
  }

  #finishCount(walk: Walk, old: Set<string>): void {
    this.#seen = Math.max(this.#seen, walk.cursor);
    if (walk.full || this.#counts === null) {
      this.#counts = walk.counts;
      this.#unreadable = walk.unreadable;
    } else {
      for (const [key, n] of walk.counts) add(this.#counts, key, n);
      this.#unreadable = (this.#unreadable ?? 0) + walk.unreadable;
    }
    this.#reportUnreadable();
    const found = [...old].map((key) => [key, this.#counts!.get(key) ?? 0] as const).filter(([, n]) => n > 0);
    if (found.length === 0) {
      this.#walk = null;
      this.#countedAtStart = true;
      this.#releaseUnused(walk.serial);
      this.#state = this.#keys.rewrappable.size === 0 ? "idle" : "watching";
      return;
    }
    this.#releaseUnused(walk.serial);
    this.#logger.info(
      `Fernet re-encryption: ${found.map(([key, n]) => `${n} record${n === 1 ? "" : "s"} under ${key}`).join(", ")}; ` +
        `moving them to the primary ${this.#keys.fingerprints[0]} (${this.#batch} a page, every ${this.#intervalMs} ms)`,
    );
    walk.phase = "re-encrypting";
    walk.cursor = walk.firstOld - 1;
    walk.started = performance.now();
    this.#state = "re-encrypting";
  }

  async #rewrapPage(walk: Walk): Promise<number> {
    const rows = (await this.#store.tokensAfter(walk.cursor, this.#batch)).filter((r) => r.id <= walk.lastOld);
    if (this.#restart) return 0;
    const counts = this.#counts!;
    const old = this.#keys.rewrappable;
    const changes: (TokenChange & { from: string })[] = [];
    for (const { id, token } of rows) {
      walk.cursor = id;
      if (this.#broken.has(id)) continue;
      const { key, old: isOld } = this.#classify(token, old);
      if (!isOld) continue;
      // Out of the count's estimate; back into `left` below unless it moves.
      counts.set(key!, Math.max(0, (counts.get(key!) ?? 0) - 1));
      try {
        changes.push({ id, previous: token, next: this.#keys.records.rotate(token), from: key! });
      } catch {
        // A MAC that checks over a message that does not decrypt: no key opens it, and none ever will.
        this.#broken.add(id);
        this.#unreadable = (this.#unreadable ?? 0) + 1;
      }
    }
    const taken = await this.#store.replaceTokens(changes);
    const lost = changes.filter((_, i) => !taken[i]);
    for (const [i, change] of changes.entries()) if (taken[i]) this.#moved(change.from, walk);
    if (lost.length > 0) {
      // Another server changed these records first: most likely it moved them too. Look at what they hold now.
      const now = new Map((await this.#store.tokensAfter(lost[0]!.id - 1, lost.at(-1)!.id - lost[0]!.id + 1)).map((r) => [r.id, r.token]));
      for (const change of lost) {
        const token = now.get(change.id);
        const seen = token === undefined ? { key: null, old: false } : this.#classify(token, old);
        if (seen.old) add(walk.left, seen.key!);
      }
    }
    if (this.#restart) return 0;
    if (rows.length === this.#batch && walk.cursor < walk.lastOld) return this.#intervalMs;
    this.#finishRewrap(walk);
    // The next walk at once: it counts what came in meanwhile, and releases kept keys none is under.
    return this.#intervalMs;
  }

  #moved(from: string, walk: Walk): void {
    this.#rewrapped += 1;
    walk.moved += 1;
    add(this.#movedFrom, from);
  }

  #finishRewrap(walk: Walk): void {
    const counts = this.#counts!;
    // What the walk left under each old key is exact for the ids it covered, and none were old outside them.
    for (const key of this.#keys.rewrappable) counts.set(key, walk.left.get(key) ?? 0);
    const left = [...walk.left.values()].reduce((a, b) => a + b, 0);
    const seconds = ((performance.now() - walk.started) / 1000).toFixed(1);
    this.#logger.info(
      `Fernet re-encryption: moved ${walk.moved} record${walk.moved === 1 ? "" : "s"} to the primary ${this.#keys.fingerprints[0]} in ${seconds} s${left ? `; ${left} changed under it by another server, checked again on the next walk` : ""}`,
    );
    this.#walk = null;
    if (left > 0) {
      // Walk everything again: the records another server rewrote are found, wherever they are.
      this.#restart = true;
      this.#state = "counting";
      return;
    }
    // No release here: a record written under a kept key while it was still in the file, after the count this walk
    // began with, is in no count yet. The next walk, at once, counts the newer records, and releases a key none is under.
    this.#state = "watching";
  }

  /**
   * Drops every kept key the count of walk `serial` found no record under, if that walk began after it was kept: a
   * kept key opens no new request, so none can be under it after such a count.
   */
  #releaseUnused(serial: number): void {
    if (this.#counts === null) return;
    for (const key of this.#keys.kept) {
      if ((this.#counts.get(key) ?? 0) > 0 || serial < (this.#keptBefore.get(key) ?? Infinity)) continue;
      const moved = this.#movedFrom.get(key) ?? 0;
      this.#movedFrom.delete(key);
      this.#keys.release(key, this.#logger, `${moved} record${moved === 1 ? "" : "s"} moved off it by this server, to ${this.#keys.fingerprints[0]}`);
    }
  }

  #reportUnreadable(): void {
    const n = this.#unreadable ?? 0;
    if (n === this.#reportedUnreadable) return;
    this.#reportedUnreadable = n;
    if (n > 0) {
      this.#logger.error(
        `${n} stored record${n === 1 ? " is" : "s are"} under no Fernet key this server holds: they read as unreadable until their key is back in ` +
          `${this.#keys.path} (as a decrypt-only line), when they are re-encrypted; a retired key is in the CA host's archive: ./pki.sh fernet restore FP`,
      );
    }
  }
}
