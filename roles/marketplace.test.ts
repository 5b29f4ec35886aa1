import { expect, test } from "bun:test";
import { createLogger } from "../shared/ops/log.ts";
import { scrape } from "../shared/testing/prometheus.ts";
import { createMarketplaceApp, ITEM } from "./marketplace.ts";

const app = createMarketplaceApp({ token: "right-token", logger: createLogger("marketplace", { write: () => {} }) });
const get = (authorization?: string) => app.handle(new Request("http://localhost/api/item", { headers: authorization ? { authorization } : {} }));

test("401 without a Bearer token or with a wrong one, the item with the right one", async () => {
  for (const header of [undefined, "Bearer wrong-token", "Basic right-token", "Bearer right-tokenX"]) {
    const response = await get(header);
    expect(response.status).toBe(401);
    expect(response.headers.get("www-authenticate")).toBe('Bearer realm="marketplace"');
  }
  const ok = await get("Bearer right-token");
  expect([ok.status, await ok.json()]).toEqual([200, ITEM]);
});

test("/metrics parses as Prometheus text and counts the 401s", async () => {
  await get();
  const metrics = await scrape(app);
  expect(metrics.value("securemesh_http_requests_total", { route: "/api/item", status: "401" })).toBeGreaterThan(0);
});
