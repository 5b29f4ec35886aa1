// One error base for every securemesh failure: a stable `code` to switch on and the HTTP `status` it maps to.

/**
 * Every code a securemesh error answers with, in one place: callers switch on these, never on message text.
 * (Codes of the platform underneath, such as node's or jose's, are theirs; network failures have their own set in
 * shared/platform/runtime/types.ts.)
 */
export type ErrorCode =
  // the request itself
  | "ERR_BAD_REQUEST"
  | "ERR_UNSUPPORTED_MEDIA_TYPE"
  | "ERR_BODY_TOO_LARGE"
  | "ERR_NOT_FOUND"
  | "ERR_METHOD_NOT_ALLOWED"
  | "ERR_TIMEOUT"
  | "ERR_CLIENT_CLOSED"
  | "ERR_HOST_NOT_ALLOWED"
  // who is calling, and what it may do
  | "ERR_PROOF"
  | "ERR_FORBIDDEN"
  | "ERR_REVOKED"
  | "ERR_UNAUTHORIZED"
  | "ERR_CONNECTION_LIMIT"
  | "ERR_CLIENT_CERT"
  | "ERR_RATE_LIMITED"
  | "ERR_IN_FLIGHT_LIMIT"
  // payloads and secrets
  | "ERR_INVALID_TOKEN"
  | "ERR_DECRYPT"
  | "ERR_SEAL"
  | "ERR_REPLAY"
  | "ERR_REPLAY_QUOTA"
  | "ERR_REPLAY_MEMORY_FULL"
  | "ERR_IDEMPOTENCY_CONFLICT"
  | "ERR_CONFLICT"
  // the hops behind
  | "ERR_UNAVAILABLE"
  | "ERR_UPSTREAM"
  | "ERR_UPSTREAM_UNCERTAIN"
  | "ERR_UNREACHABLE"
  | "ERR_KEYSERVER"
  | "ERR_KEYSERVER_IDENTITY"
  | "ERR_CACHE_READ"
  | "ERR_RETRY_BUDGET"
  // configuration and internals
  | "ERR_CONFIG"
  | "ERR_POLICY_INVALID"
  | "ERR_CRL_INVALID"
  | "ERR_KEY_ROTATION"
  | "ERR_INTERNAL";

export class MeshError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  /** Sent as Retry-After with the answer: when an overloaded or unavailable hop asks to be tried again. */
  readonly retryAfterSeconds: number | undefined;
  constructor(code: ErrorCode, status: number, message: string, options?: { cause?: unknown; retryAfterSeconds?: number }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.status = status;
    this.retryAfterSeconds = options?.retryAfterSeconds;
  }
  toJSON(): { error: string; code: ErrorCode } {
    return { error: this.message, code: this.code };
  }
}

/** The base of a failure told apart only by its message: one code, one status. */
function messageOnly(code: ErrorCode, status: number) {
  return class extends MeshError {
    constructor(message: string) {
      super(code, status, message);
    }
  };
}

/** Any Fernet token that cannot be opened. One message for every cause, so no failure is an oracle. */
export class InvalidToken extends MeshError {
  constructor() {
    super("ERR_INVALID_TOKEN", 400, "invalid or expired token");
  }
}

/** A request that is malformed: bad JSON, missing or extra fields, wrong types. */
export class BadRequest extends messageOnly("ERR_BAD_REQUEST", 400) {}

/** The sender proof is missing, forged, expired or replayed. */
export class ProofRejected extends messageOnly("ERR_PROOF", 401) {}

/** The caller is authenticated but not allowed to do this. */
export class Forbidden extends messageOnly("ERR_FORBIDDEN", 403) {}

/** An Idempotency-Key was reused for a different request. */
export class IdempotencyConflict extends MeshError {
  constructor() {
    super("ERR_IDEMPOTENCY_CONFLICT", 409, "Idempotency-Key was already used for a different request");
  }
}

/** A dependency (database, upstream) is unavailable; the request was not committed. */
export class Unavailable extends MeshError {
  constructor(message: string, options?: { cause?: unknown; retryAfterSeconds?: number }) {
    super("ERR_UNAVAILABLE", 503, message, options);
  }
}

/**
 * An identity over one of its limits in the policy (a request rate, or requests in flight): 429, with the seconds
 * after which a retry may pass, for the Retry-After header. Nothing of the request was done.
 */
export class TooManyRequests extends MeshError {
  declare readonly retryAfterSeconds: number;
  constructor(code: "ERR_RATE_LIMITED" | "ERR_IN_FLIGHT_LIMIT", message: string, retryAfterSeconds: number) {
    super(code, 429, message, { retryAfterSeconds });
  }
}

/** Bad configuration found at start-up: printed as one line, then the role exits. */
export class ConfigError extends messageOnly("ERR_CONFIG", 500) {}

/** A Fernet key rotation step that would lose data or lock a host out (fernet-keys.ts): what, and when it is safe. */
export class KeyRotationRefused extends messageOnly("ERR_KEY_ROTATION", 409) {}

/** A policy file that does not parse or names what does not exist: where, and what to fix. */
export class PolicyInvalid extends messageOnly("ERR_POLICY_INVALID", 500) {}
