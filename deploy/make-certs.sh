#!/usr/bin/env bash
# Make a private CA and a TLS certificate for the SuperLink (coordinator).
#
#   deploy/make-certs.sh OUT_DIR [EXTRA_DNS_NAME ...]
#
# Writes OUT_DIR/ca.crt (give this, and only this, to every hospital), OUT_DIR/ca.key (keep
# offline: whoever holds it can impersonate the coordinator), OUT_DIR/server.pem and
# OUT_DIR/server.key (for flower-superlink). The server certificate names localhost,
# 127.0.0.1 and "superlink" (the compose service; the SuperLink also reaches its own
# Runtime API over loopback with it) plus every EXTRA_DNS_NAME, e.g. the coordinator's
# public host name. Existing files are never overwritten: a new CA would lock out every site.
set -euo pipefail

out="${1:?usage: make-certs.sh OUT_DIR [EXTRA_DNS_NAME ...]}"
shift
days="${CERT_DAYS:-365}"
mkdir -p "$out"
for f in ca.key ca.crt server.key server.pem; do
  if [ -e "$out/$f" ]; then
    echo "error: $out/$f exists; remove it first or pick another OUT_DIR" >&2
    exit 2
  fi
done

san="DNS:localhost,DNS:superlink,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done

umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days "$days" \
  -subj "/CN=fedpggan coordinator CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -subj "/CN=superlink" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -sha256 -days "$days" -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -out "$out/server.pem" \
  -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san") \
  2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "wrote $out/ca.crt (share with sites), $out/ca.key (keep offline), $out/server.pem + server.key (SuperLink); SAN: $san"
