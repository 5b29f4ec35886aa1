// PEM bundles: a CA file may hold several certificates (the old and the new root while one is rotated out).

/** The CERTIFICATE blocks of a PEM text, in file order; other blocks and text between them are left out. */
export function certificateBlocks(pem: string | undefined): string[] {
  return pem?.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}
