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
# public host name.
#
# The CA is valid for CA_DAYS (default 3650), the server certificate for CERT_DAYS (default 365).
# To renew the server certificate, move server.pem and server.key away and run the script again:
# an existing ca.crt + ca.key is reused (a new CA would lock out every site until each had the new
# ca.crt). Existing files are never overwritten.
set -euo pipefail

out="${1:?usage: make-certs.sh OUT_DIR [EXTRA_DNS_NAME ...]}"
shift
days="${CERT_DAYS:-365}"
ca_days="${CA_DAYS:-3650}"
mkdir -p "$out"
for f in server.key server.pem; do
  if [ -e "$out/$f" ]; then
    echo "error: $out/$f exists; move it away first to renew it (ca.crt and ca.key are kept and reused)" >&2
    exit 2
  fi
done
if { [ -e "$out/ca.key" ] && [ ! -e "$out/ca.crt" ]; } || { [ ! -e "$out/ca.key" ] && [ -e "$out/ca.crt" ]; }; then
  echo "error: $out holds only one of ca.key and ca.crt; restore the other from backup (a new CA would lock out every site)" >&2
  exit 2
fi

san="DNS:localhost,DNS:superlink,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done

umask 077
if [ -e "$out/ca.key" ]; then
  # a CA made by this script before 2026-12-06 lasted CERT_DAYS only, like its server certificate
  if ! openssl x509 -checkend $((days * 86400)) -noout -in "$out/ca.crt" >/dev/null; then
    echo "error: $out/ca.crt expires before a new $days-day server certificate would; make a new CA in another OUT_DIR and send its ca.crt to every site (or renew with a smaller CERT_DAYS)" >&2
    exit 2
  fi
  ca="reused $out/ca.crt (sites keep theirs)"
else
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days "$ca_days" \
    -subj "/CN=fedpggan coordinator CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
  ca="wrote $out/ca.crt (share with sites), $out/ca.key (keep offline)"
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -subj "/CN=superlink" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -sha256 -days "$days" -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -out "$out/server.pem" \
  -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san") \
  2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "$ca; wrote $out/server.pem + server.key (SuperLink, $days days); SAN: $san"
