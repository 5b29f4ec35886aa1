// A role's stop on SIGTERM, in the order a load balancer needs (as Envoy's drain_listeners and HAProxy's soft stop):
// fail health first, so callers' health checks take this process out; stop accepting once no caller has sent for a
// moment; finish the requests in flight within a deadline; then exit. Each step is one log line.
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "../ops/log.ts";

/** The longest a draining process waits for its callers' health checks to take it out (2 probes of 1 s, and margin). */
export const DRAIN_GRACE_MS = 5000;
/**
 * Callers have taken it out once no request but a health check has come for this long. Under load requests come
 * far closer together; a gap this long under light load may come before a caller's health check saw the 503, and
 * then that caller's next request meets a closed port and fails over, which is safe for any request (it never reached
 * this process). Short, because every stop waits it out once after the last request.
 */
export const DRAIN_QUIET_MS = 300;
/** The longest requests in flight get to finish once the listener stopped accepting; the rest are cut. */
export const DRAIN_DEADLINE_MS = 10_000;
/** How often a drain looks at what is in flight. */
const POLL_MS = 50;

/** What a drain needs of a serving listener (listenReloadable's, shared/platform/http.ts). */
export interface Drainable {
  /** From now on /health answers 503 "draining", and every answer asks its client to close the connection. */
  startDraining(): void;
  /** Requests being handled now, health checks included. */
  inFlight(): number;
  /** performance.now() of the last request that was not a health check. */
  lastRequestAt(): number;
  stop(closeActiveConnections?: boolean): Promise<void>;
}

export interface DrainTimes {
  graceMs: number;
  quietMs: number;
  deadlineMs: number;
}

export interface DrainReport {
  /** Time from the start of the drain until the listener stopped accepting. */
  acceptedForMs: number;
  /** Requests in flight when accepting stopped, and those cut at the deadline. */
  inFlightAtStop: number;
  cut: number;
}

async function waitUntil(condition: () => boolean, timeoutMs: number): Promise<boolean> {
  const until = performance.now() + timeoutMs;
  while (!condition()) {
    if (performance.now() >= until) return false;
    await sleep(POLL_MS);
  }
  return true;
}

/** Drains `listener` and stops it; the role closes its own resources afterwards. */
export async function drain(
  listener: Drainable,
  logger: Logger,
  times: DrainTimes = { graceMs: DRAIN_GRACE_MS, quietMs: DRAIN_QUIET_MS, deadlineMs: DRAIN_DEADLINE_MS },
): Promise<DrainReport> {
  const started = performance.now();
  listener.startDraining();
  logger.info(`draining: /health answers 503 so that callers take this process out; accepting for up to ${times.graceMs} ms more`);
  // A process that has not been sent anything for a while is out of every rotation already: it stops at once.
  const quiet = await waitUntil(() => performance.now() - listener.lastRequestAt() >= times.quietMs, times.graceMs);
  const inFlightAtStop = listener.inFlight();
  // Stopping without closing: requests in flight finish; Bun's promise waits for them, so it is not awaited here.
  const stopped = listener.stop(false);
  const acceptedForMs = performance.now() - started;
  logger.info(
    `draining: no longer accepting (${quiet ? `no request for ${times.quietMs} ms` : `callers still sending after ${times.graceMs} ms`}); ${inFlightAtStop} requests in flight, up to ${times.deadlineMs} ms to finish`,
  );
  const finished = await waitUntil(() => listener.inFlight() === 0, times.deadlineMs);
  const cut = finished ? 0 : listener.inFlight();
  await Promise.race([stopped, sleep(finished ? times.deadlineMs : 0)]);
  await listener.stop(true);
  logger.info(finished ? "drained: every request in flight finished" : `drained: ${cut} requests still in flight were cut at the deadline`);
  return { acceptedForMs, inFlightAtStop, cut };
}
