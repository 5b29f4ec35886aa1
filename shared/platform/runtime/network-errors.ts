// Maps what each runtime says about a failed outbound connection to one NetworkErrorCode (types.ts). Bun and node
// give a `code`; Deno's rustls-backed TLS often gives only a message.
import type { NetworkErrorCode } from "./types.ts";

/** The short reason for each code, for a log line or an error (shared/ops/log.ts describeNetworkError). */
export const NETWORK_REASONS: Readonly<Record<NetworkErrorCode, string>> = {
  ECONNREFUSED: "connection refused",
  ENOTFOUND: "host not found",
  EHOSTUNREACH: "host unreachable",
  ENETUNREACH: "network unreachable",
  EPROTO: "TLS handshake failed",
  ERR_TLS_CERT: "TLS certificate refused",
  ERR_TLS_HOSTNAME: "TLS certificate does not name this host",
  ERR_UNEXPECTED_PEER: "unexpected peer identity",
  ECONNRESET: "connection reset",
};

/** The short human reason for a code, for a log line. */
export const networkReason = (code: NetworkErrorCode): string => NETWORK_REASONS[code];

/** Bun's and node's error codes. Certificate-validation codes are OpenSSL's names, as node spells them. */
export function codeFromRuntimeCode(code: unknown): NetworkErrorCode | undefined {
  if (typeof code !== "string") return undefined;
  if (code in NETWORK_REASONS) return code as NetworkErrorCode;
  if (code === "ConnectionRefused") return "ECONNREFUSED";
  if (code === "ConnectionClosed" || code === "EPIPE" || code === "ECONNABORTED") return "ECONNRESET";
  if (code === "EAI_AGAIN" || code === "DNSException") return "ENOTFOUND";
  if (code.startsWith("ERR_SSL_") || code === "ERR_TLS_HANDSHAKE_TIMEOUT") return "EPROTO";
  if (/ALTNAME|HOSTNAME_MISMATCH/.test(code)) return "ERR_TLS_HOSTNAME";
  if (/CERT|UNABLE_TO_(GET|VERIFY|DECRYPT|DECODE)|SELF_SIGNED/.test(code)) return "ERR_TLS_CERT";
  return undefined;
}

/** A message without a code, as Deno's TLS gives, e.g. "invalid peer certificate: UnknownIssuer". */
export function codeFromText(text: string): NetworkErrorCode | undefined {
  if (/connection refused/i.test(text)) return "ECONNREFUSED";
  if (/dns error|failed to lookup address|name or service not known|no address associated/i.test(text)) return "ENOTFOUND";
  if (/no route to host|host is unreachable/i.test(text)) return "EHOSTUNREACH";
  if (/network is unreachable/i.test(text)) return "ENETUNREACH";
  if (/certificate not valid for name|NotValidForName/i.test(text)) return "ERR_TLS_HOSTNAME";
  if (/invalid peer certificate|certificate (verify|not valid|expired|unknown)|UnknownIssuer|BadSignature/i.test(text)) return "ERR_TLS_CERT";
  if (/fatal alert|handshake|tls|ssl/i.test(text)) return "EPROTO";
  if (/connection reset|broken pipe|connection closed|unexpected eof|incomplete message|connection aborted|canceled/i.test(text)) return "ECONNRESET";
  return undefined;
}
