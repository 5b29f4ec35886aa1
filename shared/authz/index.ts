// The authorization feature's public surface: identities, the policy, the enforcing Authorizer, trust material.
export { identityOf, parseSpiffeId, senderName, shortName, spiffeId, IDENTITY_KINDS, TRUST_DOMAIN } from "./identity.ts";
export { ACTIONS, decide, parsePolicy, PermissionDenied, PolicyInvalid } from "./policy.ts";
export type { Action, Decision, Policy, Rule } from "./policy.ts";
export { Authorizer } from "./authorizer.ts";
export { TrustMaterial } from "./trust.ts";
export type { CrlStatus, TrustChange, TrustOptions } from "./trust.ts";
export { expectPeer, identityMatches, tlsPeerIdentity, UnexpectedPeer } from "./expect-peer.ts";
export type { ExpectPeerOptions } from "./expect-peer.ts";
export { mutualTlsListening } from "./listening.ts";
