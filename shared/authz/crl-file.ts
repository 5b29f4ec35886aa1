// crl.pem as a role may use it (#18 M2): a missing, unsigned, number-less or expired CRL never turns revocation off,
// and an older one never replaces a newer one. The rules, each a one-line reason; TrustMaterial applies them.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { displayPath } from "../platform/config.ts";
import { ConfigError } from "../platform/errors.ts";
import { CrlInvalid, parseCrl, type RevocationList } from "./crl.ts";
import { sameBytes } from "./der.ts";

export const CRL_FILE = "crl.pem";

/** How far a CRL's thisUpdate may lie ahead of this host's clock: the CA host's clock may run a little fast. */
export const CLOCK_SKEW_MS = 5 * 60_000;

/** The fix for a CRL that is missing, stale or not our CA's; never a command that could overwrite material. */
export const CRL_FIX = "run ./pki.sh crl on the CA host and copy crl.pem here";

/** A CRL that passed every rule: its list, and the PEM the TLS stack is given. */
export interface CrlInForce {
  readonly list: RevocationList;
  readonly pem: string;
}

/** A CRL read and checked on its own, or the one-line reason it cannot be used. */
export type CrlReading = { readonly crl: CrlInForce } | { readonly refused: string };

/** 0x1001: CRL numbers as `openssl crl -noout -crlnumber` prints them. */
export function formatCrlNumber(number: bigint | null): string {
  return number === null ? "none" : `0x${number.toString(16).toUpperCase()}`;
}

/**
 * Reads `<dir>/crl.pem` and checks it on its own at `now` (ms): readable, signed by `caPem`'s CA, numbered, with a
 * nextUpdate that has not passed, and a thisUpdate not ahead of this clock by more than CLOCK_SKEW_MS.
 */
export function readCrlFile(dir: string, caPem: string, now: number): CrlReading {
  const path = join(dir, CRL_FILE);
  const shown = displayPath(path);
  let pem: string;
  try {
    pem = readFileSync(path, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return { refused: `${shown} is missing` };
    return { refused: `cannot read ${shown}: ${code === "EACCES" ? "permission denied" : (code ?? (error as Error).message)}` };
  }
  let list: RevocationList;
  try {
    list = parseCrl(pem, caPem);
  } catch (error) {
    if (error instanceof CrlInvalid) return { refused: `${shown}: ${error.message}` };
    throw error;
  }
  if (list.number === null) return { refused: `${shown} has no CRL number, so an older CRL could not be told from a newer one` };
  if (list.nextUpdate === null) return { refused: `${shown} has no nextUpdate, so it never goes stale` };
  if (now > list.nextUpdate.getTime())
    return { refused: `${shown} (CRL number ${formatCrlNumber(list.number)}) expired at ${list.nextUpdate.toISOString()} (its nextUpdate)` };
  if (list.thisUpdate.getTime() > now + CLOCK_SKEW_MS) {
    return { refused: `${shown} is not valid until ${list.thisUpdate.toISOString()} (its thisUpdate; is this host's clock behind?)` };
  }
  return { crl: { list, pem } };
}

/** At start: the CRL, or a one-line ConfigError naming the file, what is wrong, and the fix. */
export function requireCrlFile(dir: string, caPem: string, now: number): CrlInForce {
  const reading = readCrlFile(dir, caPem, now);
  if ("refused" in reading) throw new ConfigError(`no usable CRL, so this role will not start: ${reading.refused}: ${CRL_FIX}`);
  return reading.crl;
}

/** What a reload finds: the CRL to put in force (`changed` false: the one in force, on disk again), or why not. */
export type NextCrl = { readonly crl: CrlInForce; readonly changed: boolean } | { readonly refused: string };

/**
 * On a reload: readCrlFile, then against the CRL in force from the same CA (null when the CA itself changed: a new
 * CA numbers afresh). The CA numbers its CRLs in order, so a lower number is an older CRL put back, and the same
 * number with other content is not ours to choose between; the same number and content is the same CRL.
 */
export function readNextCrl(dir: string, caPem: string, inForce: CrlInForce | null, now: number): NextCrl {
  const reading = readCrlFile(dir, caPem, now);
  if ("refused" in reading) return reading;
  if (!inForce) return { crl: reading.crl, changed: true };
  const shown = displayPath(join(dir, CRL_FILE));
  const [n, m] = [reading.crl.list.number!, inForce.list.number!];
  if (n > m) return { crl: reading.crl, changed: true };
  if (n < m) return { refused: `${shown} has CRL number ${formatCrlNumber(n)}, lower than the ${formatCrlNumber(m)} in force (an older CRL put back?)` };
  if (!sameBytes(reading.crl.list.tbs, inForce.list.tbs))
    return { refused: `${shown} has CRL number ${formatCrlNumber(n)}, the one in force, but other content` };
  return { crl: inForce, changed: false };
}
