// Which servers a coordinator forwards to: --servers, or --servers-file, which it re-reads when it changes and on
// SIGHUP, so adding or removing a server host needs no coordinator restart (issue 23, finding 8).
import { readFileSync } from "node:fs";
import { ConfigError } from "../platform/errors.ts";
import { watchFiles, type Watch } from "../platform/watch.ts";
import { describeError, type Logger } from "../ops/log.ts";
import type { UpstreamPool } from "../request-path/upstream.ts";

/** Checks server URLs (https://host:port); `where` names the flag or file for the one-line error. */
export function parseServerUrls(entries: readonly string[], where: string): string[] {
  const servers = entries.map((s) => s.trim()).filter(Boolean);
  for (const server of servers) {
    let url: URL;
    try {
      url = new URL(server);
    } catch {
      throw new ConfigError(`${where}: '${server.slice(0, 200)}' is not a URL (expected https://host:port)`);
    }
    if (url.protocol !== "https:") throw new ConfigError(`${where}: '${server.slice(0, 200)}' must use https://`);
  }
  if (servers.length === 0) throw new ConfigError(`${where}: at least one server URL is needed`);
  return servers;
}

/** One server URL per line; blank lines and # comments are skipped. */
export function readServersFile(path: string): string[] {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw new ConfigError(`cannot read --servers-file ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  return parseServerUrls(
    text.split("\n").map((line) => line.replace(/#.*/, "")),
    path,
  );
}

/**
 * Applies `path` to the pool whenever it changes: servers no longer listed leave at once, new ones enter rotation at
 * their first good health check. A file that does not parse leaves the membership as it is, with one line.
 */
export function watchMembership(path: string, pool: UpstreamPool, logger: Logger): Watch {
  return watchFiles([path], () => {
    try {
      const { added, removed } = pool.setServers(readServersFile(path));
      logger.info(
        `servers reloaded from ${path}: ${pool.servers.length} (added ${added.length ? added.join(", ") : "none"}; removed ${removed.length ? removed.join(", ") : "none"})`,
      );
    } catch (error) {
      logger.error(`servers NOT reloaded, the membership stays as it is: ${describeError(error).replace(/^ERR_CONFIG: /, "")}`);
    }
  });
}
