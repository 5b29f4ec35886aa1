import { expect, test } from "bun:test";
import { Forbidden } from "../shared/errors.ts";
import { createLogger } from "../shared/log.ts";
import { scrape } from "../shared/testing/prometheus.ts";
import { checkApiUri, createProxyApp, parseAllowlist } from "./secureproxy.ts";

const allow = parseAllowlist(["marketplace=localhost:5005,127.0.0.1:5005"]);

test("ApiUri must be https, without credentials, on the token type's allowlist", () => {
  expect(checkApiUri("https://localhost:5005/api/item", "marketplace", allow).href).toBe("https://localhost:5005/api/item");
  const refused = [
    ["http://localhost:5005/api/item", "marketplace"],
    ["https://user:pw@localhost:5005/api/item", "marketplace"],
    ["https://localhost:5006/api/item", "marketplace"],
    ["https://LOCALHOST.:5005/api/item", "marketplace"],
    ["https://169.254.169.254/latest/meta-data/", "marketplace"],
    ["https://[::1]:5005/", "marketplace"],
    ["https://localhost:5005/api/item", "other"],
  ] as const;
  for (const [uri, type] of refused) expect(() => checkApiUri(uri, type, allow)).toThrow(Forbidden);
  expect(() => checkApiUri("not a url", "marketplace", allow)).toThrow("ApiUri is not a URL");
});

test("a disallowed ApiUri is refused before the KeyServer is asked", async () => {
  const app = createProxyApp({
    keyserver: "https://127.0.0.1:1", allow, format: "jose", timeoutMs: 1000,
    keyserverTls: { cert: "", key: "", ca: "", rejectUnauthorized: true }, apiTls: { ca: "" },
    logger: createLogger("secureproxy", { write: () => {} }),
  });
  const response = await app.handle(new Request("http://localhost/request_api", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ ClientId: "client1", TokenType: "marketplace", ApiUri: "https://evil.example/" }),
  }));
  expect(response.status).toBe(403);
  expect(await response.json()).toEqual({ error: "ApiUri host evil.example:443 is not allowed for token type 'marketplace'", code: "ERR_FORBIDDEN" });
  const metrics = await scrape(app);
  expect(metrics.value("securemesh_http_requests_total", { route: "/request_api", method: "POST", status: "403" })).toBe(1);
});
