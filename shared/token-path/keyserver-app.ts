// The KeyServer's app: a token is released only to a TLS caller the policy lets fetch tokens, for an identity it
// lets use them, through a hybrid exchange (JOSE or the original format), once per nonce, with one audit line per
// attempt. roles/keyserver.ts runs it.
import { parseSpiffeId, type Authorizer, type RequestLimiter } from "../authz/index.ts";
import { BadRequest, MeshError } from "../platform/errors.ts";
import { createApp, peerIdentity, readBodyLimited } from "../platform/http.ts";
import { printable, type Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { ReplayRejected, type NonceMemory } from "./replay.ts";
import {
  type EcdhKeyPair,
  ON_BEHALF_OF_HEADER,
  openJoseRequest,
  openLegacyRequest,
  proxyResource,
  type RsaKeyPair,
  sealJoseResponse,
  sealLegacyResponse,
  type TokenRequest,
} from "./token-exchange.ts";
import type { TokenVault } from "./token-store.ts";

/** Whether the original JSON format may come without timestamp and nonce (#11 L8). */
export type LegacyReplay = "require" | "allow";

export interface KeyserverDeps {
  vault: TokenVault;
  keys: RsaKeyPair;
  /** The X25519 key of the opt-in ECDH-ES requests; without it they do not decrypt. */
  ecdh?: EcdhKeyPair;
  nonces: NonceMemory;
  logger: Logger;
  /** Decides tokens.fetch for the TLS caller and proxy.use for whom it asks. */
  authz: Authorizer;
  /** Whether the original JSON format may come without timestamp and nonce (#11 L8). */
  legacyReplay: LegacyReplay;
  metrics?: Metrics;
  /** Requests in flight and rate of whom each request is for (the on-behalf-of identity), per the policy (issue 20). */
  limiter?: RequestLimiter;
}

type Outcome = "released" | "forbidden" | "not_found" | "replay" | "replay_quota" | "decrypt_error" | "bad_request" | "limited" | "error";

function outcomeOf(error: unknown): Outcome {
  switch ((error as MeshError).code) {
    case "ERR_FORBIDDEN":
      return "forbidden";
    case "ERR_DECRYPT":
      return "decrypt_error";
    case "ERR_REPLAY":
      return "replay";
    case "ERR_REPLAY_QUOTA":
      return "replay_quota";
    case "ERR_NOT_FOUND":
      return "not_found";
    case "ERR_BAD_REQUEST":
    case "ERR_UNSUPPORTED_MEDIA_TYPE":
      return "bad_request";
    case "ERR_RATE_LIMITED":
    case "ERR_IN_FLIGHT_LIMIT":
      return "limited";
    default:
      return "error";
  }
}

/** Whom the caller asks for: the on-behalf-of header, which must be a SPIFFE ID, or else the caller itself. */
function onBehalfOf(request: Request, caller: string): string {
  const named = request.headers.get(ON_BEHALF_OF_HEADER);
  if (named === null) return caller;
  if (!parseSpiffeId(named)) throw new BadRequest(`${ON_BEHALF_OF_HEADER} must be a SPIFFE ID such as spiffe://securemesh/client/client1`);
  return named;
}

export function createKeyserverApp({ vault, keys, ecdh, nonces, logger, authz, legacyReplay, metrics = new Metrics(), limiter }: KeyserverDeps) {
  const releases = metrics.counter("securemesh_token_releases_total", "Token release attempts, by outcome.", ["outcome"]);
  /**
   * One line per release attempt: the TLS caller and whom it asked for (#11 H1), and on an error its code (#11
   * M4: "outcome=error" alone said nothing). Never the token, and only printable caller-supplied text.
   */
  const audit = (who: { caller: string; onBehalfOf: string }, request: Partial<TokenRequest>, outcome: Outcome, error?: unknown) => {
    releases.inc({ outcome });
    const code = outcome === "error" ? String((error as { code?: unknown })?.code ?? (error as Error)?.name ?? "unknown") : undefined;
    const fields = {
      caller: who.caller || "-",
      onBehalfOf: who.onBehalfOf || "-",
      clientId: request.clientId ?? "-",
      tokenType: request.tokenType ?? "-",
      outcome,
      ...(code ? { code } : {}),
    };
    logger.info(
      `AUDIT ${new Date().toISOString()} caller=${printable(fields.caller)} on_behalf_of=${printable(fields.onBehalfOf)} ` +
        `client=${printable(fields.clientId)} type=${printable(fields.tokenType)} outcome=${outcome}${code ? ` code=${printable(code)}` : ""}`,
      { audit: fields },
    );
  };

  return createApp({ logger, metrics, metricsRoute: authz.requirePeer("metrics.read") })
    .get("/health", async () => {
      await vault.store.ping();
      return { status: "ok", role: "keyserver", store: vault.store.kind };
    })
    .get("/public_key", () => ({ public_key: keys.publicPem }))
    .post("/public_key", () => ({ public_key: keys.publicPem }), { parse: "none" })
    .get("/.well-known/jwks.json", () => ({ keys: ecdh ? [keys.jwk, ecdh.jwk] : [keys.jwk] }))
    .post(
      "/",
      async ({ request }) => {
        // The caller's SPIFFE ID, from this connection's verified certificate (bound by the listener).
        const caller = peerIdentity(request);
        // What the audit line names until the header is checked; onBehalfOf() then says whom the request is for.
        const who = { caller, onBehalfOf: request.headers.get(ON_BEHALF_OF_HEADER) ?? caller };
        let parsed: Partial<TokenRequest> = {};
        let release: (() => void) | undefined;
        try {
          authz.require(who.caller, "tokens.fetch");
          who.onBehalfOf = onBehalfOf(request, who.caller);
          // Before the body is read and its RSA decryption paid for.
          release = limiter?.admit(who.onBehalfOf);
          const type = (request.headers.get("content-type") ?? "").toLowerCase();
          const jose = type.startsWith("application/jose");
          if (!jose && !type.startsWith("application/json"))
            throw new MeshError("ERR_UNSUPPORTED_MEDIA_TYPE", 415, "Content-Type must be application/json or application/jose");
          const text = new TextDecoder().decode(await readBodyLimited(request));
          parsed = jose ? await openJoseRequest(keys, text, ecdh) : await openLegacyRequest(keys, parseJson(text));
          // Defence in depth (#11 H1): the proxy checked this too, against the same policy.
          authz.require(who.onBehalfOf, "proxy.use", proxyResource(parsed.clientId!, parsed.tokenType!));
          checkReplay(nonces, parsed, { jose, legacyReplay, caller: who.onBehalfOf });
          const token = await vault.reveal(parsed.clientId!, parsed.tokenType!);
          if (token === undefined) throw new MeshError("ERR_NOT_FOUND", 404, "no token for that clientId and tokenType");
          const answer = jose
            ? new Response(await sealJoseResponse(token, parsed.sessionKey!), { headers: { "content-type": "application/jose" } })
            : Response.json({ token: sealLegacyResponse(token, parsed.sessionKey!) });
          audit(who, parsed, "released");
          return answer;
        } catch (error) {
          audit(who, parsed, outcomeOf(error), error);
          throw error;
        } finally {
          release?.();
        }
      },
      { parse: "none" },
    );
}

/**
 * JOSE requests always carry the replay fields. The original format had them optional, so the same body could be
 * released again and again (#11 L8); now they are required there too, unless the KeyServer runs with
 * `--legacy-replay allow` for old clients. The nonce counts against the quota of whom the token is for (#11 M3).
 */
function checkReplay(nonces: NonceMemory, request: Partial<TokenRequest>, options: { jose: boolean; legacyReplay: LegacyReplay; caller: string }): void {
  const carriesFields = request.timestamp !== undefined || request.nonce !== undefined;
  if (!options.jose && !carriesFields) {
    if (options.legacyReplay === "allow") return;
    throw new ReplayRejected("timestamp and nonce are required (old clients need the KeyServer's --legacy-replay allow)");
  }
  nonces.accept(request.timestamp, request.nonce, options.caller);
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new MeshError("ERR_BAD_REQUEST", 400, "request body is not valid JSON");
  }
}
