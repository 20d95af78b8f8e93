#!/bin/sh
# Make a private CA and a server certificate for the compose demo: gen-certs.sh OUT_DIR HOSTNAME.
# Real deployments use certificates from their own PKI; this is for trying flora across hosts.
set -eu
out=${1:?usage: gen-certs.sh OUT_DIR HOSTNAME}
host=${2:?usage: gen-certs.sh OUT_DIR HOSTNAME}
mkdir -p "$out"
if [ -f "$out/server.pem" ]; then
  echo "certificates already in $out"
  exit 0
fi
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=flora demo CA" \
  -keyout "$out/ca-key.pem" -out "$out/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" \
  -keyout "$out/server-key.pem" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n' "$host" > "$out/san.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" -CAcreateserial \
  -days 30 -extfile "$out/san.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/san.ext" "$out/ca-key.pem"
chmod 644 "$out/ca.pem" "$out/server.pem"
chmod 600 "$out/server-key.pem"
echo "wrote $out/ca.pem, $out/server.pem, $out/server-key.pem for $host"
