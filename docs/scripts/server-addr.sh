# Sourced by the measurement scripts: the address a chat-server started
# with `--addr 127.0.0.1:0` reports, read from the files its stdout and
# stderr go to.
#
#   server_addr OUT LOG    # prints IP:PORT, or fails after about 10 s

server_addr() {
  local addr=""
  for _ in $(seq 100); do
    addr=$(grep -ho 'listening on [0-9.:]*' "$@" 2>/dev/null | head -1 | awk '{print $3}') || true
    if [ -n "$addr" ]; then
      echo "$addr"
      return 0
    fi
    sleep 0.1
  done
  return 1
}
