// The policy a role enforces right now: loaded at start, reloaded on change, every decision audited and counted.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { displayPath } from "../platform/config.ts";
import { ConfigError } from "../platform/errors.ts";
import { describeError, printable, type Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { peerIdentity } from "../platform/runtime/peer.ts";
import { watchFiles, type Watch } from "../platform/watch.ts";
import type { Limits } from "./limits.ts";
import { decide, limitsOf, parsePolicy, PermissionDenied, type Action, type Decision, type Policy } from "./policy.ts";

/** sha256:<first 16 hex> of a policy file's bytes: two hosts with the same hash enforce the same file (issue 23). */
export function policyHash(text: string): string {
  return `sha256:${createHash("sha256").update(text).digest("hex").slice(0, 16)}`;
}

export class Authorizer {
  #policy: Policy;
  #hash: string;
  readonly #path: string;
  readonly #logger: Logger;
  readonly #decisions;
  #watch: Watch | null = null;
  /** limits() per identity under the policy in force; emptied when a new policy is put in force. */
  readonly #limitsOf = new Map<string, Limits>();

  /** Reads and checks the policy file; a policy that does not parse stops the role at start (ConfigError). */
  constructor(path: string, logger: Logger, metrics: Metrics = new Metrics()) {
    this.#path = path;
    this.#logger = logger;
    ({ policy: this.#policy, hash: this.#hash } = Authorizer.#read(path));
    this.#decisions = metrics.counter("securemesh_authz_decisions_total", "Authorization decisions, by identity, action and outcome.", [
      "identity",
      "action",
      "decision",
    ]);
  }

  static #read(path: string): { policy: Policy; hash: string } {
    let text: string;
    try {
      text = readFileSync(path, "utf8");
    } catch (error) {
      throw new ConfigError(`cannot read policy ${displayPath(path)}: ${(error as NodeJS.ErrnoException).code ?? describeError(error)}`);
    }
    try {
      return { policy: parsePolicy(text), hash: policyHash(text) };
    } catch (error) {
      throw new ConfigError(`policy ${displayPath(path)}: ${(error as Error).message}`);
    }
  }

  get policy(): Policy {
    return this.#policy;
  }

  /** The hash of the policy in force (policyHash), for /health and the check command. */
  get hash(): string {
    return this.#hash;
  }

  /** Re-reads the file. A policy that does not parse leaves the running one in force, with one clear line. */
  reload(): boolean {
    try {
      ({ policy: this.#policy, hash: this.#hash } = Authorizer.#read(this.#path));
      this.#limitsOf.clear();
      this.#logger.info(`policy reloaded: ${this.#policy.rules.length} rules`);
      return true;
    } catch (error) {
      this.#logger.error(`policy NOT reloaded, the previous one stays in force: ${(error as Error).message}`);
      return false;
    }
  }

  /** Reloads on SIGHUP and whenever the file changes. */
  watch(): this {
    this.#watch ??= watchFiles([this.#path], () => this.reload());
    return this;
  }

  stop(): void {
    this.#watch?.stop();
  }

  /** Connections `identity` may hold at once on a listener, from the policy's limits (read live, so edits apply). */
  connectionLimit(identity: string): number {
    return this.limits(identity).connections;
  }

  /**
   * Everything `identity` may take under the policy in force. A RequestLimiter asks on every request, so each
   * identity's answer is kept until the policy changes (a bounded map: identities come from certificates).
   */
  limits(identity: string): Limits {
    let limits = this.#limitsOf.get(identity);
    if (limits) return limits;
    if (this.#limitsOf.size >= 10_000) this.#limitsOf.clear();
    limits = limitsOf(this.#policy, identity);
    this.#limitsOf.set(identity, limits);
    return limits;
  }

  /** Whether the policy allows it, without an audit line: for choosing between two permissions before require(). */
  allows(identity: string, action: Action, resource = ""): boolean {
    return decide(this.#policy, identity, action, resource).allow;
  }

  /** Decides, writes one audit line, counts it. */
  decide(identity: string, action: Action, resource = ""): Decision {
    const decision = decide(this.#policy, identity, action, resource);
    const outcome = decision.allow ? "allow" : "deny";
    this.#decisions.inc({ identity: identity || "-", action, decision: outcome });
    // Identity and resource can be caller-supplied text (a ClientId, an on-behalf-of header): escaped here, once.
    const fields = { identity: printable(identity || "-"), action, resource: printable(resource || "-"), decision: outcome };
    this.#logger.info(`AUTHZ ${outcome} identity=${fields.identity} action=${action} resource=${fields.resource} (${printable(decision.reason)})`, {
      authz: fields,
    });
    return decision;
  }

  /** decide(), throwing PermissionDenied (403 naming the identity and the missing permission) on deny. */
  require(identity: string, action: Action, resource = ""): Decision {
    const decision = this.decide(identity, action, resource);
    if (!decision.allow) throw new PermissionDenied(decision);
    return decision;
  }

  /** require() of `action` for each request's verified caller, the identity its listener bound to the connection. */
  requirePeer(action: Action): (request: Request) => Decision {
    return (request) => this.require(peerIdentity(request), action);
  }
}
