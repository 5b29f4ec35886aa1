import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { waitFor } from "../../harness/cluster.ts";
import { policyPath } from "../platform/config.ts";
import { createLogger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { Authorizer } from "./authorizer.ts";
import { identityOf } from "./identity.ts";
import { decide, limitsOf, parsePolicy, PolicyInvalid } from "./policy.ts";
import { DEFAULT_CONNECTIONS, DEFAULT_IN_FLIGHT } from "./limits.ts";

const client1 = "spiffe://securemesh/client/client1";
const client2 = "spiffe://securemesh/client/client2";
const coordinator = "spiffe://securemesh/coordinator/coordinator";
const secureproxy = "spiffe://securemesh/secureproxy/secureproxy";
const server = "spiffe://securemesh/server/server";

describe("the repository's default policy", () => {
  const policy = parsePolicy(readFileSync(policyPath(), "utf8"));
  const allowed = (identity: string, action: Parameters<typeof decide>[2], resource = "") => decide(policy, identity, action, resource).allow;

  test("keeps the demo working: clients write and read the shared view, only the coordinator forwards, only the proxy fetches tokens", () => {
    const table = [client1, client2, coordinator, secureproxy, server].map((id) => [
      id.split("/").pop(),
      allowed(id, "records.write"),
      allowed(id, "view.read", "all"),
      allowed(id, "cache.invalidate"),
      allowed(id, "forward"),
      allowed(id, "tokens.fetch"),
    ]);
    expect(table).toEqual([
      ["client1", true, true, true, false, false],
      ["client2", true, true, true, false, false],
      ["coordinator", false, false, false, true, false],
      ["secureproxy", false, false, false, false, true],
      ["server", false, false, false, false, false],
    ]);
  });

  test("each client uses only its own ClientId through the SecureProxy", () => {
    expect(allowed(client1, "proxy.use", "client1/marketplace")).toBe(true);
    expect(allowed(client2, "proxy.use", "client1/marketplace")).toBe(false);
    expect(allowed(client1, "proxy.use", "client1/other-type")).toBe(false);
    expect(allowed(coordinator, "proxy.use", "client1/marketplace")).toBe(false);
  });

  test("default deny: an unknown identity, or none, may do nothing", () => {
    expect(decide(policy, "spiffe://securemesh/client/client3", "records.write")).toMatchObject({ allow: false, reason: "no rule allows it" });
    expect(decide(policy, "", "records.write")).toMatchObject({ allow: false, reason: "no verified identity" });
  });
});

describe("policy format", () => {
  test("wildcards: an identity prefix and a resource prefix", () => {
    const policy = parsePolicy(JSON.stringify({ rules: [{ identity: "spiffe://securemesh/client/*", allow: ["view.read:own", "proxy.use:shared/*"] }] }));
    expect(decide(policy, client2, "view.read", "own").allow).toBe(true);
    expect(decide(policy, client2, "view.read", "all").allow).toBe(false);
    expect(decide(policy, client2, "proxy.use", "shared/marketplace").allow).toBe(true);
    expect(decide(policy, "spiffe://securemesh/clients/x", "view.read", "own").allow).toBe(false);
  });

  test("mistakes are named with their place", () => {
    const bad = (policy: unknown) => {
      try {
        parsePolicy(typeof policy === "string" ? policy : JSON.stringify(policy));
        return "accepted";
      } catch (error) {
        expect(error).toBeInstanceOf(PolicyInvalid);
        return (error as Error).message;
      }
    };
    expect(bad("{")).toStartWith("policy is not valid JSON");
    expect(bad({ rule: [] })).toBe('policy must be a JSON object with a "rules" array');
    expect(bad({ rules: [], extra: 1 })).toBe('unknown top-level key "extra" (expected "rules", "limits", "comment")');
    expect(bad({ rules: [{ identity: "client1", allow: [] }] })).toStartWith("rules[0].identity must be a SPIFFE ID");
    expect(bad({ rules: [{ identity: "spiffe://securemesh/*/x", allow: [] }] })).toBe(STAR_IN_IDENTITY(0));
    expect(bad({ rules: [{ identity: client1, allow: ["records.delete"] }] })).toStartWith('rules[0]: unknown action "records.delete"');
    expect(bad({ rules: [{ identity: client1, allow: "records.write" }] })).toBe("rules[0].allow must be an array of strings");
    expect(bad({ rules: [{ identity: client1, allow: [], deny: [] }] })).toBe('rules[0] has an unknown key "deny"');
  });
});

const STAR_IN_IDENTITY = (i: number) => `rules[${i}].identity: "*" only as a whole last segment, e.g. spiffe://securemesh/client/*`;
const STAR_IN_RESOURCE = (i: number, j: number) =>
  `rules[${i}].allow[${j}]: "*" only as a whole last segment or the whole resource, e.g. proxy.use:client1/* or proxy.use:*`;

describe("a * is a whole last path segment, never part of a name", () => {
  const refusal = (rules: unknown[]) => {
    try {
      parsePolicy(JSON.stringify({ rules }));
      return "accepted";
    } catch (error) {
      expect(error).toBeInstanceOf(PolicyInvalid);
      return (error as Error).message;
    }
  };

  test("an identity with * inside a name is refused at parse time with its place", () => {
    const rules = (identity: string) => [
      { identity: client2, allow: [] },
      { identity: coordinator, allow: ["forward"] },
      { identity, allow: ["records.write"] },
    ];
    expect(
      ["client/client1*", "client/clie*t1", "client*", "client/**", "*/client1", "client/*/x"].map((tail) => refusal(rules(`spiffe://securemesh/${tail}`))),
    ).toEqual(Array(6).fill(STAR_IN_IDENTITY(2)));
    expect(["client/*", "*"].map((tail) => refusal(rules(`spiffe://securemesh/${tail}`)))).toEqual(["accepted", "accepted"]);
  });

  test("a resource with * inside a name is refused; * after / or as the whole resource is accepted", () => {
    const rules = (permission: string) => [{ identity: client1, allow: ["records.write", permission] }];
    expect(
      ["proxy.use:client1*", "proxy.use:client1/market*", "proxy.use:*/marketplace", "proxy.use:client1/*/x", "proxy.use:**", "view.read:a*"].map((p) =>
        refusal(rules(p)),
      ),
    ).toEqual(Array(6).fill(STAR_IN_RESOURCE(0, 1)));
    expect(["proxy.use:client1/*", "proxy.use:*", "view.read:*", "proxy.use:client1/marketplace"].map((p) => refusal(rules(p)))).toEqual(
      Array(4).fill("accepted"),
    );
  });

  test("client/* grants client10, but client/client1 and a client1/* resource do not reach client10", () => {
    const policy = parsePolicy(
      JSON.stringify({
        rules: [
          { identity: "spiffe://securemesh/client/*", allow: ["view.read:own"] },
          { identity: client1, allow: ["proxy.use:client1/*"] },
          { identity: "spiffe://securemesh/coordinator/*", allow: ["forward"] },
        ],
      }),
    );
    const client10 = "spiffe://securemesh/client/client10";
    expect({
      client10ReadsOwn: decide(policy, client10, "view.read", "own").allow,
      client10UsesClient1: decide(policy, client10, "proxy.use", "client1/marketplace").allow,
      client1UsesClient1: decide(policy, client1, "proxy.use", "client1/marketplace").allow,
      client1UsesClient10: decide(policy, client1, "proxy.use", "client10/marketplace").allow,
      client1UsesBareClient1: decide(policy, client1, "proxy.use", "client1").allow,
      coordinatorsPrefixOnly: decide(policy, "spiffe://securemesh/coordinator2/x", "forward").allow,
      emptyLastSegment: decide(policy, "spiffe://securemesh/client/", "view.read", "own").allow,
    }).toEqual({
      client10ReadsOwn: true,
      client10UsesClient1: false,
      client1UsesClient1: true,
      client1UsesClient10: false,
      client1UsesBareClient1: false,
      coordinatorsPrefixOnly: false,
      emptyLastSegment: false,
    });
  });

  test("the policies the repository and its tests write still parse", () => {
    const wide = { identity: client1, allow: ["proxy.use:*"] };
    expect(() => parsePolicy(readFileSync(policyPath(), "utf8"))).not.toThrow();
    expect(() => parsePolicy(JSON.stringify({ rules: [wide, { identity: secureproxy, allow: ["tokens.fetch"] }] }))).not.toThrow();
  });
});

describe("Authorizer", () => {
  const setup = () => {
    const dir = mkdtempSync(join(tmpdir(), "securemesh-authz-"));
    const path = join(dir, "policy.json");
    const write = (rules: unknown[]) => {
      // As an editor saves: a new file renamed over the old one.
      writeFileSync(`${path}.tmp`, JSON.stringify({ rules }));
      renameSync(`${path}.tmp`, path);
    };
    write([{ identity: client1, allow: ["records.write"] }]);
    const lines: string[] = [];
    const metrics = new Metrics();
    const authz = new Authorizer(path, createLogger("t", { color: false, format: "text", write: (l) => lines.push(l) }), metrics);
    return { path, write, lines, metrics, authz };
  };

  test("require() throws a 403 naming identity and permission, and every decision is an audit line", () => {
    const { authz, lines } = setup();
    expect(authz.require(client1, "records.write").allow).toBe(true);
    expect(() => authz.require(client2, "proxy.use", "client1/marketplace")).toThrow(`${client2} lacks permission proxy.use:client1/marketplace`);
    expect(lines).toEqual([
      `AUTHZ allow identity=${client1} action=records.write resource=- (${client1} may records.write)`,
      `AUTHZ deny identity=${client2} action=proxy.use resource=client1/marketplace (no rule allows it)`,
    ]);
  });

  test("a policy edit takes effect on reload; one that does not parse leaves the old one in force with one clear line", () => {
    const { authz, write, path, lines } = setup();
    write([{ identity: client2, allow: ["records.write"] }]);
    expect(authz.reload()).toBe(true);
    expect(authz.allows(client2, "records.write")).toBe(true);
    expect(authz.allows(client1, "records.write")).toBe(false);
    writeFileSync(path, '{"rules": [ {"identity": ');
    expect(authz.reload()).toBe(false);
    expect(authz.allows(client2, "records.write")).toBe(true);
    expect(lines.filter((l) => l.startsWith("policy NOT reloaded"))).toHaveLength(1);
  });

  test("limits(): kept per identity until a reload puts another policy in force (issue 20)", () => {
    const { authz, path } = setup();
    expect(authz.limits(client2).inFlight).toBe(DEFAULT_IN_FLIGHT);
    writeFileSync(path, JSON.stringify({ rules: [], limits: [{ identity: client2, inFlight: 3 }] }));
    expect(authz.limits(client2).inFlight).toBe(DEFAULT_IN_FLIGHT); // the file alone changes nothing in force
    expect(authz.reload()).toBe(true);
    expect([authz.limits(client2).inFlight, authz.connectionLimit(client2), authz.limits(client1).inFlight]).toEqual([
      3,
      DEFAULT_CONNECTIONS,
      DEFAULT_IN_FLIGHT,
    ]);
  });

  test("watch(): a file change is picked up without a restart", async () => {
    const { authz, write } = setup();
    authz.watch();
    try {
      write([{ identity: client2, allow: ["forward"] }]);
      await waitFor("the edited policy to be in force", () => authz.allows(client2, "forward"), 5000);
    } finally {
      authz.stop();
    }
  });

  test("a policy that does not parse at start stops the role with a ConfigError", () => {
    const { path } = setup();
    writeFileSync(path, "nope");
    expect(() => new Authorizer(path, createLogger("t", { write: () => {} }))).toThrow(/^policy .*policy\.json: policy is not valid JSON/);
  });
});

describe("identityOf", () => {
  test("the SPIFFE URI SAN names the identity; more than one is ambiguous", () => {
    expect(identityOf({ subject: "O=securemesh\nCN=x", subjectAltName: "URI:spiffe://securemesh/client/client1, DNS:client1", clientAuth: true })).toBe(
      client1,
    );
    expect(identityOf({ subjectaltname: "URI:spiffe://securemesh/client/a, URI:spiffe://securemesh/client/b", clientAuth: true })).toBe("");
    expect(identityOf({ subjectaltname: "URI:spiffe://securemesh/client/a b", clientAuth: true })).toBe("");
  });

  test("without the SAN, the CN is the documented fallback", () => {
    expect(identityOf({ subject: "O=securemesh\nCN=client1", subjectAltName: "DNS:client1", clientAuth: true })).toBe(client1);
    expect(identityOf({ subject: { CN: "coordinator" }, clientAuth: true, serverAuth: true })).toBe(coordinator);
    expect(identityOf({ subject: { CN: "server" }, clientAuth: false, serverAuth: true })).toBe(server);
    // Found by attack: a client certificate named after a role stays a client, and a certificate with a URI SAN
    // of another trust domain is not read through its CN at all.
    expect(identityOf({ subject: { CN: "secureproxy" }, clientAuth: true })).toBe("spiffe://securemesh/client/secureproxy");
    expect(identityOf({ subject: { CN: "coordinator" }, subjectaltname: "URI:spiffe://partner.example/client/x", clientAuth: true, serverAuth: true })).toBe(
      "",
    );
    expect(identityOf({ subject: { CN: ["a", "b"] }, clientAuth: true })).toBe("");
    expect(identityOf({ subject: "CN=evil/../x", clientAuth: true })).toBe("");
  });
});

describe("limits (issue 18, L2)", () => {
  const policyWith = (limits: unknown) => parsePolicy(JSON.stringify({ rules: [], limits }));
  test("the first entry naming an identity sets its connections; the rest get the default", () => {
    const policy = policyWith([
      { identity: "spiffe://securemesh/coordinator/*", connections: 1024 },
      { identity: "spiffe://securemesh/client/client2", connections: 4, comment: "a noisy one" },
      { identity: "*", connections: 64 },
    ]);
    expect(["coordinator/coordinator", "client/client2", "client/client1"].map((id) => limitsOf(policy, `spiffe://securemesh/${id}`).connections)).toEqual([
      1024, 4, 64,
    ]);
    expect(limitsOf(policyWith([]), "spiffe://securemesh/client/client1").connections).toBe(DEFAULT_CONNECTIONS);
  });

  test("mistakes are named with their place", () => {
    const bad = (limits: unknown) => {
      try {
        policyWith(limits);
        return "parsed";
      } catch (error) {
        return (error as Error).message;
      }
    };
    expect(bad({})).toBe('"limits" must be an array');
    expect(bad([{ identity: "spiffe://securemesh/client/client1*", connections: 1 }])).toBe(
      'limits[0].identity must be a SPIFFE ID, a prefix ending in /*, or "*"',
    );
    expect(bad([{ identity: "*", connections: 0 }])).toBe("limits[0].connections must be a whole number from 1 to 1000000");
    expect(bad([{ identity: "*", connections: 1.5 }])).toBe("limits[0].connections must be a whole number from 1 to 1000000");
    expect(bad([{ identity: "*", rate: 1 }])).toBe('limits[0].rate must be an object { "perSecond": N, "burst": N }');
    expect(bad([{ identity: "*", rate: { perSecond: 5 } }])).toBe("limits[0].rate.burst must be a whole number from 1 to 1000000");
    expect(bad([{ identity: "*", rate: { perSecond: 5, burst: 5, per: 1 } }])).toBe('limits[0].rate has an unknown key "per" (known: perSecond, burst)');
    expect(bad([{ identity: "*", inFlight: -1 }])).toBe("limits[0].inFlight must be a whole number from 1 to 1000000");
    expect(bad([{ identity: "*", requests: 1 }])).toBe('limits[0] has an unknown key "requests" (known: identity, connections, inFlight, rate, comment)');
  });

  test("each kind comes from the first entry that sets it: a specific rate above a wildcard's in-flight cap (issue 20)", () => {
    const policy = policyWith([
      { identity: "spiffe://securemesh/client/client2", rate: { perSecond: 50, burst: 100 } },
      { identity: "spiffe://securemesh/client/*", inFlight: 16 },
    ]);
    expect(limitsOf(policy, "spiffe://securemesh/client/client2")).toEqual({
      connections: DEFAULT_CONNECTIONS,
      inFlight: 16,
      rate: { perSecond: 50, burst: 100 },
    });
    expect(limitsOf(policy, "spiffe://securemesh/client/client1")).toEqual({ connections: DEFAULT_CONNECTIONS, inFlight: 16, rate: null });
    expect(limitsOf(policy, "spiffe://securemesh/server/server1")).toEqual({ connections: DEFAULT_CONNECTIONS, inFlight: DEFAULT_IN_FLIGHT, rate: null });
  });
});
