// The SecureProxy's flag values that are lists: the KeyServers to try, and per-token-type entries (TYPE=VALUE).
import { ConfigError } from "../platform/errors.ts";

/** `TYPE=VALUE` entries of a repeatable flag; `bare` names the key of an entry without `TYPE=` (or refuses it). */
export function typedEntries(flag: string, entries: readonly string[], bare?: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const entry of entries) {
    const match = /^([A-Za-z0-9_.-]+)=(.+)$/.exec(entry);
    if (!match && bare === undefined) throw new ConfigError(`${flag} '${entry}': expected TYPE=VALUE`);
    out.set(match ? match[1]! : bare!, match ? match[2]! : entry);
  }
  return out;
}

/** `--keyserver URL[,URL…]`: https URLs without a path, in the order they are tried. */
export function parseKeyservers(value: string): string[] {
  const urls = value
    .split(",")
    .map((u) => u.trim())
    .filter(Boolean);
  if (urls.length === 0) throw new ConfigError("--keyserver needs at least one URL such as https://10.0.0.7:5003");
  return urls.map((raw) => {
    let url: URL;
    try {
      url = new URL(raw);
    } catch {
      throw new ConfigError(`--keyserver '${raw}' is not a URL such as https://10.0.0.7:5003`);
    }
    if (url.protocol !== "https:" || (url.pathname !== "/" && url.pathname !== "") || url.search || url.username) {
      throw new ConfigError(`--keyserver '${raw}' must be https://HOST:PORT, without a path, query or credentials`);
    }
    return url.origin;
  });
}
