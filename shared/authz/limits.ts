// What one identity may take of a role, as data in the policy file beside what it may do: for now how many
// connections it may hold at once (issue 18, L2). An identity no entry names gets DEFAULT_CONNECTIONS.
import { MAX_CONNECTIONS_PER_IDENTITY } from "../platform/runtime/limits.ts";
import { PolicyInvalid } from "../platform/errors.ts";

/** The connections an identity no limit names may hold: room for a busy client, not for a flood. */
export const DEFAULT_CONNECTIONS = MAX_CONNECTIONS_PER_IDENTITY;

export interface Limit {
  /** A SPIFFE ID, a prefix ending in "/*", or "*" for every identity. */
  identity: string;
  /** Connections it may hold open at once, on each listener of each role. */
  connections?: number;
}

export interface Limits {
  connections: number;
}

const LIMIT_KEYS = ["identity", "connections", "comment"];

/** The policy's "limits" array, checked entry by entry; a mistake is named with its place. */
export function parseLimits(raw: unknown, isIdentityPattern: (pattern: string) => boolean): Limit[] {
  if (raw === undefined) return [];
  if (!Array.isArray(raw)) throw new PolicyInvalid('"limits" must be an array');
  return raw.map((entry, i): Limit => {
    const where = `limits[${i}]`;
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) throw new PolicyInvalid(`${where} must be an object`);
    const unknown = Object.keys(entry).find((k) => !LIMIT_KEYS.includes(k));
    if (unknown) throw new PolicyInvalid(`${where} has an unknown key ${JSON.stringify(unknown.slice(0, 32))} (known: ${LIMIT_KEYS.join(", ")})`);
    const { identity, connections } = entry as Record<string, unknown>;
    if (typeof identity !== "string" || (identity !== "*" && !isIdentityPattern(identity))) {
      throw new PolicyInvalid(`${where}.identity must be a SPIFFE ID, a prefix ending in /*, or "*"`);
    }
    if (connections !== undefined && (!Number.isInteger(connections) || (connections as number) < 1 || (connections as number) > 1_000_000)) {
      throw new PolicyInvalid(`${where}.connections must be a whole number from 1 to 1000000`);
    }
    return { identity, ...(connections === undefined ? {} : { connections: connections as number }) };
  });
}

/**
 * The limits of `identity`: for each kind, the first entry that names it and sets that kind, in the file's order
 * (so a specific entry goes above a wildcard), else the default.
 */
export function limitsFor(limits: readonly Limit[], identity: string, matches: (pattern: string, id: string) => boolean): Limits {
  const first = limits.find((limit) => limit.connections !== undefined && (limit.identity === "*" || matches(limit.identity, identity)));
  return { connections: first?.connections ?? DEFAULT_CONNECTIONS };
}
