// What one identity may take of a role, as data in the policy file beside what it may do (issue 18, L2; issue 20):
// connections held at once, requests in flight at once, and a request rate (a token bucket). Each kind is taken
// from the first entry that names the identity and sets that kind; a kind no entry sets gets its default.
import { MAX_CONNECTIONS_PER_IDENTITY } from "../platform/runtime/limits.ts";
import { PolicyInvalid } from "../platform/errors.ts";

/** The connections an identity no limit names may hold: room for a busy client, not for a flood. */
export const DEFAULT_CONNECTIONS = MAX_CONNECTIONS_PER_IDENTITY;
/**
 * Requests one identity may have in flight at once on a role when no entry says: well above what the
 * client library or a coordinator keeps open (64 connections), so a default never bites a well-behaved caller.
 */
export const DEFAULT_IN_FLIGHT = 256;

/** A token bucket: `perSecond` requests on average, up to `burst` at once after a quiet spell. */
export interface RateLimit {
  perSecond: number;
  burst: number;
}

export interface Limit {
  /** A SPIFFE ID, a prefix ending in "/*", or "*" for every identity. */
  identity: string;
  /** Connections it may hold open at once, on each listener of each role. */
  connections?: number;
  /** Requests it may have in flight at once, on each role process. */
  inFlight?: number;
  /** Requests it may start, on each role process; none means no rate limit. */
  rate?: RateLimit;
}

export interface Limits {
  connections: number;
  inFlight: number;
  rate: RateLimit | null;
}

const LIMIT_KEYS = ["identity", "connections", "inFlight", "rate", "comment"];
const MAX = 1_000_000;

function wholeNumber(value: unknown, where: string, max = MAX): number {
  if (!Number.isInteger(value) || (value as number) < 1 || (value as number) > max) {
    throw new PolicyInvalid(`${where} must be a whole number from 1 to ${max}`);
  }
  return value as number;
}

function parseRate(raw: unknown, where: string): RateLimit {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new PolicyInvalid(`${where} must be an object { "perSecond": N, "burst": N }`);
  const unknown = Object.keys(raw).find((k) => k !== "perSecond" && k !== "burst");
  if (unknown) throw new PolicyInvalid(`${where} has an unknown key ${JSON.stringify(unknown.slice(0, 32))} (known: perSecond, burst)`);
  const { perSecond, burst } = raw as Record<string, unknown>;
  return { perSecond: wholeNumber(perSecond, `${where}.perSecond`), burst: wholeNumber(burst, `${where}.burst`) };
}

/** The policy's "limits" array, checked entry by entry; a mistake is named with its place. */
export function parseLimits(raw: unknown, isIdentityPattern: (pattern: string) => boolean): Limit[] {
  if (raw === undefined) return [];
  if (!Array.isArray(raw)) throw new PolicyInvalid('"limits" must be an array');
  return raw.map((entry, i): Limit => {
    const where = `limits[${i}]`;
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) throw new PolicyInvalid(`${where} must be an object`);
    const unknown = Object.keys(entry).find((k) => !LIMIT_KEYS.includes(k));
    if (unknown) throw new PolicyInvalid(`${where} has an unknown key ${JSON.stringify(unknown.slice(0, 32))} (known: ${LIMIT_KEYS.join(", ")})`);
    const { identity, connections, inFlight, rate } = entry as Record<string, unknown>;
    if (typeof identity !== "string" || (identity !== "*" && !isIdentityPattern(identity))) {
      throw new PolicyInvalid(`${where}.identity must be a SPIFFE ID, a prefix ending in /*, or "*"`);
    }
    return {
      identity,
      ...(connections === undefined ? {} : { connections: wholeNumber(connections, `${where}.connections`) }),
      ...(inFlight === undefined ? {} : { inFlight: wholeNumber(inFlight, `${where}.inFlight`) }),
      ...(rate === undefined ? {} : { rate: parseRate(rate, `${where}.rate`) }),
    };
  });
}

/**
 * The limits of `identity`: for each kind, the first entry that names it and sets that kind, in the file's order
 * (so a specific entry goes above a wildcard), else the default.
 */
export function limitsFor(limits: readonly Limit[], identity: string, matches: (pattern: string, id: string) => boolean): Limits {
  const named = limits.filter((limit) => limit.identity === "*" || matches(limit.identity, identity));
  return {
    connections: named.find((l) => l.connections !== undefined)?.connections ?? DEFAULT_CONNECTIONS,
    inFlight: named.find((l) => l.inFlight !== undefined)?.inFlight ?? DEFAULT_IN_FLIGHT,
    rate: named.find((l) => l.rate !== undefined)?.rate ?? null,
  };
}
