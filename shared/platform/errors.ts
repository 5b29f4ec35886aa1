// One error base for every securemesh failure: a stable `code` to switch on and the HTTP `status` it maps to.

export class MeshError extends Error {
  readonly code: string;
  readonly status: number;
  constructor(code: string, status: number, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
  }
  toJSON(): { error: string; code: string } {
    return { error: this.message, code: this.code };
  }
}

/** Any Fernet token that cannot be opened. One message for every cause, so no failure is an oracle. */
export class InvalidToken extends MeshError {
  constructor() {
    super("ERR_INVALID_TOKEN", 400, "invalid or expired token");
  }
}

/** A request that is malformed: bad JSON, missing or extra fields, wrong types. */
export class BadRequest extends MeshError {
  constructor(message: string) {
    super("ERR_BAD_REQUEST", 400, message);
  }
}

/** The sender proof is missing, forged, expired or replayed. */
export class ProofRejected extends MeshError {
  constructor(message: string) {
    super("ERR_PROOF", 401, message);
  }
}

/** The caller is authenticated but not allowed to do this. */
export class Forbidden extends MeshError {
  constructor(message: string) {
    super("ERR_FORBIDDEN", 403, message);
  }
}

/** An Idempotency-Key was reused for a different request. */
export class IdempotencyConflict extends MeshError {
  constructor() {
    super("ERR_IDEMPOTENCY_CONFLICT", 409, "Idempotency-Key was already used for a different request");
  }
}

/** A dependency (database, upstream) is unavailable; the request was not committed. */
export class Unavailable extends MeshError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("ERR_UNAVAILABLE", 503, message, options);
  }
}

/** Bad configuration found at start-up: printed as one line, then the role exits. */
export class ConfigError extends MeshError {
  constructor(message: string) {
    super("ERR_CONFIG", 500, message);
  }
}
