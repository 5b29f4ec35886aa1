// The one place that asks which runtime this is. Everything else uses `runtime` and never checks.
import { bunRuntime } from "./bun.ts";
import { denoRuntime } from "./deno.ts";
import type { Runtime } from "./types.ts";

export const runtime: Runtime = "Deno" in globalThis ? denoRuntime : bunRuntime;

export type { ClientTls, IdentityCheck, NetworkErrorCode, ReloadableListener, Runtime, ServableApp, ServerTls } from "./types.ts";
export { NetworkError } from "./types.ts";
