// Authorization as data: one default-deny policy file names identities and what each may do, and every
// decision in every role goes through decide() (compare Envoy RBAC, Istio AuthorizationPolicy, Vault policies).
import { MeshError, PolicyInvalid } from "../platform/errors.ts";
import { limitsFor, parseLimits, type Limit, type Limits } from "./limits.ts";

export { PolicyInvalid };

/**
 * What can be allowed. A permission is "action" or "action:resource"; the resource narrows it:
 * - records.write          store a record (POST /api/data), as the sender the proof names
 * - view.read:all|own      read get_data(): every sender's records, or only your own
 * - cache.invalidate       invalidate every server's get_data() cache
 * - cache.stats            read the servers' cache counters
 * - forward                call the servers on a caller's behalf (the coordinator)
 * - tokens.fetch           fetch API tokens from the KeyServer (the SecureProxy)
 * - proxy.use:CLIENT/TYPE  have the SecureProxy call an API with ClientId CLIENT's token of TokenType TYPE
 * - admin.drain            take a server out of a coordinator's rotation and put it back (an operator)
 */
export const ACTIONS = [
  "records.write",
  "view.read",
  "cache.invalidate",
  "cache.stats",
  "forward",
  "tokens.fetch",
  "proxy.use",
  "admin.drain",
  "metrics.read",
  "status.read",
] as const;
export type Action = (typeof ACTIONS)[number];

export interface Rule {
  /** A SPIFFE ID, or one ending in a whole "*" segment (spiffe://securemesh/client/*). */
  identity: string;
  allow: string[];
}

export interface Policy {
  rules: readonly Rule[];
  /** What each identity may take: connections at once (limits.ts). */
  limits: readonly Limit[];
}

export interface Decision {
  allow: boolean;
  identity: string;
  action: Action;
  resource: string;
  /** The permission that allowed it, or why it was denied. */
  reason: string;
}

/** An authenticated caller without the permission: 403, naming the identity and what it lacks. */
export class PermissionDenied extends MeshError {
  constructor(decision: Decision) {
    const wanted = decision.resource ? `${decision.action}:${decision.resource}` : decision.action;
    super("ERR_FORBIDDEN", 403, `${decision.identity || "an unidentified caller"} lacks permission ${wanted}`);
  }
}

const RESOURCE = /^[A-Za-z0-9_.*/-]{1,128}$/;
const IDENTITY = /^spiffe:\/\/[A-Za-z0-9._-]+\/[A-Za-z0-9_/*-]+$/;

/**
 * A "*" stands for whole path segments only: the last one, right after "/" (or the whole resource). Inside a
 * name it had no boundary: `client/client1*` granted client10 and `proxy.use:client1*` client10's tokens.
 */
function starIsWholeLastSegment(pattern: string, wholeAllowed: boolean): boolean {
  const star = pattern.indexOf("*");
  if (star === -1) return true;
  if (star !== pattern.length - 1) return false;
  return pattern.length === 1 ? wholeAllowed : pattern[star - 1] === "/";
}

/** Checks a parsed policy file; every mistake is named with its place, so a bad edit says what to fix. */
export function parsePolicy(text: string): Policy {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new PolicyInvalid(`policy is not valid JSON (${(error as Error).message})`);
  }
  if (typeof raw !== "object" || raw === null || !Array.isArray((raw as { rules?: unknown }).rules)) {
    throw new PolicyInvalid('policy must be a JSON object with a "rules" array');
  }
  const topLevelExtra = Object.keys(raw).find((k) => k !== "rules" && k !== "limits" && k !== "comment");
  if (topLevelExtra) throw new PolicyInvalid(`unknown top-level key ${JSON.stringify(topLevelExtra.slice(0, 32))} (expected "rules", "limits", "comment")`);
  const rules = (raw as { rules: unknown[] }).rules.map((rule, i): Rule => {
    const where = `rules[${i}]`;
    if (typeof rule !== "object" || rule === null) throw new PolicyInvalid(`${where} must be an object`);
    const { identity, allow, ...extra } = rule as Record<string, unknown>;
    const unknownKey = Object.keys(extra).find((k) => k !== "comment");
    if (unknownKey) throw new PolicyInvalid(`${where} has an unknown key ${JSON.stringify(unknownKey.slice(0, 32))}`);
    if (typeof identity !== "string" || !IDENTITY.test(identity)) {
      throw new PolicyInvalid(`${where}.identity must be a SPIFFE ID such as spiffe://securemesh/client/client1, "*" only as a whole last segment`);
    }
    if (!starIsWholeLastSegment(identity, false)) {
      throw new PolicyInvalid(`${where}.identity: "*" only as a whole last segment, e.g. spiffe://securemesh/client/*`);
    }
    if (!Array.isArray(allow) || allow.some((p) => typeof p !== "string")) throw new PolicyInvalid(`${where}.allow must be an array of strings`);
    for (const [j, permission] of (allow as string[]).entries()) {
      const [action, resource] = splitPermission(permission);
      if (!(ACTIONS as readonly string[]).includes(action)) {
        throw new PolicyInvalid(`${where}: unknown action ${JSON.stringify(action.slice(0, 32))} (known: ${ACTIONS.join(", ")})`);
      }
      if (resource !== "" && !RESOURCE.test(resource)) throw new PolicyInvalid(`${where}: bad resource in ${JSON.stringify(permission.slice(0, 64))}`);
      if (!starIsWholeLastSegment(resource, true)) {
        throw new PolicyInvalid(`${where}.allow[${j}]: "*" only as a whole last segment or the whole resource, e.g. proxy.use:client1/* or proxy.use:*`);
      }
    }
    return { identity, allow: allow as string[] };
  });
  const limits = parseLimits((raw as { limits?: unknown }).limits, (pattern) => IDENTITY.test(pattern) && starIsWholeLastSegment(pattern, false));
  return { rules, limits };
}

/** What `identity` may take under `policy` (its first matching limits, else the defaults). */
export function limitsOf(policy: Policy, identity: string): Limits {
  return limitsFor(policy.limits, identity, patternMatches);
}

function splitPermission(permission: string): [string, string] {
  const colon = permission.indexOf(":");
  return colon === -1 ? [permission, ""] : [permission.slice(0, colon), permission.slice(colon + 1)];
}

/**
 * A pattern ending in "*" (after "/", or "*" alone: parsePolicy allows no other) matches one or more further
 * characters after its prefix, so `client/*` matches `client/client10` but not `client/`; otherwise the whole
 * string must match.
 */
export function patternMatches(pattern: string, value: string): boolean {
  if (!pattern.endsWith("*")) return pattern === value;
  const prefix = pattern.slice(0, -1);
  return value.startsWith(prefix) && (prefix === "" || value.length > prefix.length);
}

/**
 * The one authorization decision. Default deny: allowed only when a rule for this identity grants the action
 * on this resource. A permission without a resource grants the action on every resource.
 * @example decide(policy, "spiffe://securemesh/client/client1", "proxy.use", "client1/marketplace")
 */
export function decide(policy: Policy, identity: string, action: Action, resource = ""): Decision {
  if (identity) {
    for (const rule of policy.rules) {
      if (!patternMatches(rule.identity, identity)) continue;
      for (const permission of rule.allow) {
        const [allowedAction, allowedResource] = splitPermission(permission);
        if (allowedAction === action && (allowedResource === "" || patternMatches(allowedResource, resource))) {
          return { allow: true, identity, action, resource, reason: `${rule.identity} may ${permission}` };
        }
      }
    }
  }
  return { allow: false, identity, action, resource, reason: identity ? "no rule allows it" : "no verified identity" };
}
