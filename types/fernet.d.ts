// The npm `fernet` package ships no types; only what the tests use as an oracle is declared.
declare module "fernet" {
  export class Secret {
    constructor(key: string);
  }
  export class Token {
    constructor(options: { secret: Secret; token?: string; ttl?: number });
    encode(message: string): string;
    decode(token?: string): string;
  }
  const fernet: { Secret: typeof Secret; Token: typeof Token };
  export default fernet;
}
