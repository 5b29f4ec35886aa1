// The authorization feature's public surface: identities, the policy, the enforcing Authorizer, trust material.
export { identityOf, isIdentityPattern, parseSpiffeId, senderName, shortName, spiffeId, IDENTITY_KINDS, TRUST_DOMAIN } from "./identity.ts";
export { ACTIONS, decide, limitsOf, parsePolicy, patternMatches, PermissionDenied, PolicyInvalid } from "./policy.ts";
export { DEFAULT_CONNECTIONS, DEFAULT_IN_FLIGHT } from "./limits.ts";
export type { Limit, Limits, RateLimit } from "./limits.ts";
export { RequestLimiter } from "./request-limiter.ts";
export type { Action, Decision, Policy, Rule } from "./policy.ts";
export { Authorizer, policyHash } from "./authorizer.ts";
export { TrustMaterial } from "./trust.ts";
export type { CrlStatus, TrustChange, TrustOptions } from "./trust.ts";
export { expectPeer, identityMatches, tlsPeerIdentity, UnexpectedPeer } from "./expect-peer.ts";
export type { ExpectPeerOptions } from "./expect-peer.ts";
export { mutualTlsListening } from "./listening.ts";
