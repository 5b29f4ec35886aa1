// Limits and header names shared by every listener, on every runtime: read by bun-gate.ts, node-listener.ts and
// admission.ts; http.ts re-exports the body limit and the idle timeout.

/** Bodies above this get a 413: at once when Content-Length says so, else when the bytes read pass it (#11 L6). */
export const DEFAULT_BODY_LIMIT = 64 * 1024;
/** Seconds a connection may sit idle, or dribble its headers (slowloris), before it is closed. */
export const IDLE_TIMEOUT_S = 10;
/** Set by the node-based listeners, where Bun's requestIP is not available. */
export const PEER_ADDRESS_HEADER = "x-securemesh-peer-address";
/** Set by the peer-identity listener from the verified certificate, after any client-sent copy is dropped. */
export const PEER_HEADER = "x-securemesh-peer";

/**
 * Time from accept for the TLS handshake and the whole request head together, as HAProxy's `timeout http-request`:
 * the socket's idle timeout restarts with every byte, so one header byte every few seconds held a connection
 * open forever (#11 M2). The same budget applies between requests on a keep-alive connection.
 */
export const HEADER_DEADLINE_MS = 10_000;
/** Time for a request body once its head is in: a body dribbled byte by byte is cut off with a 408. */
export const BODY_DEADLINE_MS = 30_000;
/** Time from accept for the TLS handshake alone: a socket that never starts one holds its place only this long. */
export const HANDSHAKE_DEADLINE_MS = 3_000;
/**
 * Connections from one address still in their TLS handshake, before anyone is known. When a new one comes, the
 * oldest of them is closed, not the newcomer: a flood of bare TCP connections from the proxy's own address held
 * every place and shut the proxy out, with no certificate at all (found by attack on #11). A real handshake takes
 * milliseconds, so it is done long before 256 newer connections push it out; 32 cut off a coordinator (or a bench
 * client) opening 64 kept-alive connections to a server at once (issue 18).
 */
export const MAX_HANDSHAKES_PER_ADDRESS = 256;
/**
 * Open connections one verified identity may hold; more are closed once the handshake says who they are (#11 M2).
 * Sized for the SecureProxy, the KeyServer's one legitimate caller: it checks the KeyServer's identity on every
 * call, so Bun's fetch opens a connection per call, and 60 concurrent releases lost 29 of them under a cap of 32.
 */
export const MAX_CONNECTIONS_PER_IDENTITY = 128;
