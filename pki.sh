#!/usr/bin/env bash
# Builds securemesh's PKI: one CA, one certificate per identity, and the shared Fernet key.
#
#   ./pki.sh                         create whatever is missing (existing material is kept)
#   ./pki.sh --force                 regenerate everything
#   ./pki.sh --rsa                   RSA-2048 keys instead of ECDSA P-256
#   ./pki.sh issue NAME --client|--server|--both   add one identity
#
# Output goes to $PKI_DIR, or certs/ beside this script.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

command -v openssl >/dev/null 2>&1 || { echo "pki.sh: openssl not found; install it (apt-get install openssl)" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
dir=${PKI_DIR:-$here/certs}
force=0
key_type=ec
action=all
issue_name=""
issue_kind=""

while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --rsa) key_type=rsa ;;
    --client) issue_kind=client ;;
    --server) issue_kind=server ;;
    --both) issue_kind=both ;;
    issue) action=issue; shift; issue_name=${1:-} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "pki.sh: unknown argument '$1' (see ./pki.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

umask 077
mkdir -p "$dir"

new_key() { # path
  if [ "$key_type" = rsa ]; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null
  else
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  fi
  chmod 600 "$1"
}

make_ca() {
  new_key "$dir/ca_key.pem"
  openssl req -x509 -new -key "$dir/ca_key.pem" -sha256 -days 3650 \
    -subj "/O=securemesh/CN=securemesh CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$dir/ca_cert.pem" 2>/dev/null
  chmod 644 "$dir/ca_cert.pem"
}

# kind: server | client | both. Servers get the loopback SANs, clients a DNS SAN with their name.
make_leaf() { # name kind
  local name=$1 kind=$2 eku sans usage ext
  case "$kind" in
    server) eku=serverAuth ;;
    client) eku=clientAuth ;;
    both) eku=serverAuth,clientAuth ;;
    *) echo "pki.sh: identity kind must be --client, --server or --both" >&2; exit 2 ;;
  esac
  if [ "$kind" = client ]; then sans="DNS:$name"; else sans="DNS:localhost,IP:127.0.0.1,IP:::1"; fi
  usage=digitalSignature
  [ "$key_type" = rsa ] && usage=digitalSignature,keyEncipherment
  new_key "$dir/${name}_key.pem"
  ext=$(mktemp)
  cat >"$ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,$usage
extendedKeyUsage=$eku
subjectAltName=$sans
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
  openssl req -new -key "$dir/${name}_key.pem" -subj "/O=securemesh/CN=$name" 2>/dev/null |
    openssl x509 -req -CA "$dir/ca_cert.pem" -CAkey "$dir/ca_key.pem" \
      -set_serial "0x$(openssl rand -hex 16)" -days 397 -sha256 -extfile "$ext" \
      -out "$dir/${name}_cert.pem" 2>/dev/null
  rm -f "$ext"
  chmod 644 "$dir/${name}_cert.pem"
}

ensure_leaf() { # name kind
  if [ "$force" = 1 ] || [ ! -s "$dir/$1_cert.pem" ] || [ ! -s "$dir/$1_key.pem" ]; then
    make_leaf "$1" "$2"
    echo "pki.sh: issued $1 ($2)"
  fi
}

if [ "$force" = 1 ] || [ ! -s "$dir/ca_cert.pem" ] || [ ! -s "$dir/ca_key.pem" ]; then
  make_ca
  force=1 # a new CA invalidates every leaf
  echo "pki.sh: created CA in $dir"
fi

if [ "$action" = issue ]; then
  [ -n "$issue_name" ] || { echo "pki.sh: issue needs a NAME" >&2; exit 2; }
  [[ "$issue_name" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "pki.sh: NAME may hold letters, digits, - and _ only" >&2; exit 2; }
  [ -n "$issue_kind" ] || { echo "pki.sh: issue $issue_name needs --client, --server or --both" >&2; exit 2; }
  ensure_leaf "$issue_name" "$issue_kind"
  exit 0
fi

ensure_leaf server server
ensure_leaf coordinator both
ensure_leaf client1 client
ensure_leaf client2 client
ensure_leaf keyserver server
ensure_leaf secureproxy both
ensure_leaf marketplace server

if [ "$force" = 1 ] || [ ! -s "$dir/encryption_key.txt" ]; then
  # Fernet key: url-safe base64 of 32 random bytes (16 signing, 16 encryption).
  openssl rand 32 | openssl base64 -A | tr '+/' '-_' >"$dir/encryption_key.txt"
  echo >>"$dir/encryption_key.txt"
  chmod 600 "$dir/encryption_key.txt"
  echo "pki.sh: wrote encryption_key.txt"
fi
