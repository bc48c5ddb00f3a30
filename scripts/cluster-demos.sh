# The deploy demos, sourced by scripts/cluster (which sets BIN, TAG, PROJECT and `build`).
# Each one stands up its own cluster (own compose project, secrets, host ports, volumes),
# puts `unibus workload run` on it, changes the cluster, then lets `unibus workload check`
# judge the history. Everything docker-side is removed on exit, pass or fail.

DEMO_START=$(date +%s)
now_ms() { date +%s%3N; }
step() { echo "== [+$(($(date +%s) - DEMO_START))s] $*" >&2; }
die() { echo "demo: $*" >&2; exit 1; }
# row LABEL VALUE: a report line, aligned like `unibus workload check`'s (${#} counts characters).
row() { printf '%s%*s %s\n' "$1" $((34 - ${#1})) "" "$2"; }

# demo_setup NAME: a work dir, the demo's own project/ports/secrets, cleanup on exit.
demo_setup() {
  DNAME="$1"
  DPROJECT="$PROJECT-$DNAME"
  WORK="${UNIBUS_DEMO_DIR:-$(mktemp -d -t "unibus-$DNAME.XXXXXX")}"
  mkdir -p "$WORK"
  DSECRETS="$WORK/secrets"
  P1="${UNIBUS_N1_PORT:-14222}" P2="${UNIBUS_N2_PORT:-14223}" P3="${UNIBUS_N3_PORT:-14224}"
  H1="${UNIBUS_N1_HTTP_PORT:-18080}" H2="${UNIBUS_N2_HTTP_PORT:-18081}" H3="${UNIBUS_N3_HTTP_PORT:-18082}"
  PORT=([1]="$P1" [2]="$P2" [3]="$P3")
  HTTP=([1]="$H1" [2]="$H2" [3]="$H3")
  SERVERS="tls://127.0.0.1:$P1,tls://127.0.0.1:$P2,tls://127.0.0.1:$P3"
  WORKLOAD_PID=""
  trap demo_cleanup EXIT
  [ -x "$BIN" ] || die "no unibus binary at $BIN (scripts/setup, or set UNIBUS_BIN)"
  step "$DNAME demo: work dir $WORK, compose project $DPROJECT, client ports $P1-$P3"
}

demo_cleanup() {
  local rc=$?
  [ -n "$WORKLOAD_PID" ] && kill "$WORKLOAD_PID" 2>/dev/null && wait "$WORKLOAD_PID" 2>/dev/null
  [ -n "${SINGLE:-}" ] && docker logs "$SINGLE" >"$WORK/single.log" 2>&1
  [ -n "${SINGLE:-}" ] && docker rm -f -v "$SINGLE" >/dev/null 2>&1
  dcompose logs --no-color --timestamps >"$WORK/cluster.log" 2>&1 || true
  dcompose down -v --remove-orphans >/dev/null 2>&1 || true
  echo "demo: cleaned up (containers, volumes, network of $DPROJECT); histories and logs in $WORK" >&2
  exit "$rc"
}

# compose for the demo's cluster; TAG may be overridden per call (DTAG=… dcompose …).
dcompose() {
  UNIBUS_SECRETS="$DSECRETS" UNIBUS_TAG="${DTAG:-$TAG}" \
    UNIBUS_N1_PORT="$P1" UNIBUS_N2_PORT="$P2" UNIBUS_N3_PORT="$P3" \
    UNIBUS_N1_HTTP_PORT="$H1" UNIBUS_N2_HTTP_PORT="$H2" UNIBUS_N3_HTTP_PORT="$H3" \
    docker-compose -p "$DPROJECT" -f cluster/docker-compose.yml "$@"
}

container() { dcompose ps -q "$1"; }

health() { docker inspect --format '{{.State.Health.Status}}' "$1" 2>/dev/null || echo gone; }

# wait_healthy NODE SECS
wait_healthy() {
  local c deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    c=$(container "$1")
    [ -n "$c" ] && [ "$(health "$c")" = healthy ] && return 0
    sleep 0.5
  done
  dcompose logs --tail 40 "$1" >&2
  die "$1 not healthy after $2 s"
}

# wait_current N SECS: node N's view says every bucket has all its replicas current.
wait_current() {
  local deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    "$BIN" node status --http "127.0.0.1:${HTTP[$1]}" 2>/dev/null | grep -q "all replicas current" && return 0
    sleep 0.5
  done
  "$BIN" cluster status --http "127.0.0.1:${HTTP[$1]}" >&2 || true
  die "n$1: replicas not all current after $2 s"
}

cluster_up() {
  "$BIN" cluster init --out "$DSECRETS" --nodes n1,n2,n3 --hosts localhost,127.0.0.1 >/dev/null
  dcompose up -d 2>&1 | sed 's/^/   /' >&2
  for n in n1 n2 n3; do wait_healthy "$n" 120; done
}

# as_service ARGS…: a CLI command as the nodes' service user (bucket admin), over TLS.
as_service() { "$BIN" "$@" --server "$SERVERS" --seed-file "$DSECRETS/service.seed" --ca "$DSECRETS/ca.crt"; }

# start_workload HISTORY SERVERS: the host-side workload, as the cluster's admin.
start_workload() {
  "$BIN" workload run --server "$2" --seed-file "$DSECRETS/admin.seed" --ca "$DSECRETS/ca.crt" \
    --history "$1" 2>"$1.log" &
  WORKLOAD_PID=$!
  local deadline=$(($(date +%s) + 30))
  until grep -q '"ev":"write"' "$1" 2>/dev/null; do
    kill -0 "$WORKLOAD_PID" 2>/dev/null || { cat "$1.log" >&2; die "the workload did not start"; }
    [ "$(date +%s)" -lt "$deadline" ] || die "the workload wrote nothing in 30 s"
    sleep 0.2
  done
}

stop_workload() {
  kill -TERM "$WORKLOAD_PID"
  wait "$WORKLOAD_PID" || die "the workload failed (see $1.log)"
  WORKLOAD_PID=""
}

# --- the growth path --------------------------------------------------------------------

upgrade_demo() {
  demo_setup upgrade
  local next="$TAG-next" sp="${UNIBUS_SINGLE_PORT:-14225}"
  step "images: unibus:$TAG (running) and unibus:$next (the upgrade)"
  docker image inspect "unibus:$TAG" >/dev/null 2>&1 || build "$TAG" >&2
  build "$next" >&2

  step "1. a single node (SQLite, dev secrets) in a container, seeded through the control plane"
  SINGLE="$DPROJECT-single"
  docker rm -f -v "$SINGLE" >/dev/null 2>&1 || true
  docker run -d --name "$SINGLE" -p "127.0.0.1:$sp:4222" "unibus:$TAG" \
    node up --name single --data /data --listen 0.0.0.0:4222 --http 127.0.0.1:8080 >/dev/null
  local deadline=$(($(date +%s) + 60))
  until docker exec "$SINGLE" /usr/local/bin/unibus node status --http 127.0.0.1:8080 >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { docker logs "$SINGLE" >&2; die "single node not ready"; }
    sleep 0.5
  done
  mkdir -p "$WORK/single"
  docker cp "$SINGLE:/data/secrets/admin.seed" "$WORK/single/admin.seed"
  docker cp "$SINGLE:/data/secrets/ca.crt" "$WORK/single/ca.crt"
  "$BIN" workload run --server "tls://127.0.0.1:$sp" --seed-file "$WORK/single/admin.seed" \
    --ca "$WORK/single/ca.crt" --history "$WORK/seed.jsonl" --duration 3 --prefix seed 2>&1 |
    sed 's/^/   /' >&2
  local as_single=(--server "tls://127.0.0.1:$sp" --seed-file "$WORK/single/admin.seed" --ca "$WORK/single/ca.crt")
  "$BIN" room create seed-history "${as_single[@]}" >/dev/null || die "cannot create seed-history"
  printf 'first\nsecond\nthird\n' | "$BIN" send seed-history "${as_single[@]}" >/dev/null ||
    die "cannot send to seed-history"

  step "2. stop it (lame duck) and take its data out (membership.db, jetstream/)"
  docker stop -t 60 "$SINGLE" >/dev/null
  mkdir -p "$WORK/single-data"
  docker cp "$SINGLE:/data/membership.db" "$WORK/single-data/membership.db"
  for f in membership.db-wal membership.db-shm; do
    docker cp "$SINGLE:/data/$f" "$WORK/single-data/$f" 2>/dev/null || true
  done
  docker cp "$SINGLE:/data/jetstream" "$WORK/single-data/jetstream"

  step "3. a fresh three-node cluster (decentralized, buckets at R1)"
  cluster_up
  step "   workload running against n1..n3 (writes, new connections)"
  start_workload "$WORK/workload.jsonl" "$SERVERS"

  step "4. unibus migrate (SQLite → KV, room history → ROOMS; verified)"
  as_service migrate --from "$WORK/single-data/membership.db" --history "$WORK/single-data" 2>&1 |
    sed 's/^/   /' >&2 || die "migrate did not verify"
  step "   the seeded messages are in the cluster (listen as the single node's admin)"
  local heard
  heard=$("$BIN" listen seed-history --count 3 --timeout 20 --server "$SERVERS" \
    --seed-file "$WORK/single/admin.seed" --ca "$DSECRETS/ca.crt" | awk '{print $NF}' | tr '\n' ' ')
  [ "$heard" = "first second third " ] || die "migrated history reads back as '$heard'"
  HISTORY_READ=3
  step "   the seeded rooms are in the cluster (read back as the single node's admin)"
  "$BIN" workload check --history "$WORK/seed.jsonl" --server "$SERVERS" \
    --seed-file "$WORK/single/admin.seed" --ca "$DSECRETS/ca.crt" >"$WORK/seed-check.txt" ||
    { cat "$WORK/seed-check.txt" >&2; die "seeded data missing after migrate"; }

  step "5. R1 → R3"
  local t0 t1
  t0=$(now_ms)
  as_service cluster replicas 3 2>&1 | sed 's/^/   /' >&2 || die "cluster replicas 3 failed"
  t1=$(now_ms)
  R3_SECS=$(awk "BEGIN { printf \"%.1f\", ($t1 - $t0) / 1000 }")

  step "6. rolling restart onto unibus:$next, one node at a time through lame duck"
  local t2 i
  t2=$(date +%s)
  for i in 1 2 3; do
    step "   n$i: stop (lame duck, up to 60 s)"
    dcompose stop -t 60 "n$i" 2>&1 | sed 's/^/   /' >&2
    # Recreating the container on the new image drops its logs: keep them for the report.
    dcompose logs --no-color --timestamps "n$i" >"$WORK/n$i-before-upgrade.log" 2>&1 || true
    step "   n$i: start on unibus:$next"
    DTAG="$next" dcompose up -d --no-deps "n$i" 2>&1 | sed 's/^/   /' >&2
    wait_healthy "n$i" 120
    wait_current "$i" 120
  done
  ROLL_SECS=$(($(date +%s) - t2))
  for i in 1 2 3; do
    docker inspect --format "   n$i runs {{.Config.Image}}" "$(container "n$i")" >&2
  done
  sleep 2

  step "7. stop the workload and check its history against the cluster"
  stop_workload "$WORK/workload.jsonl"
  local rc=0
  "$BIN" workload check --history "$WORK/workload.jsonl" --server "$SERVERS" \
    --seed-file "$DSECRETS/admin.seed" --ca "$DSECRETS/ca.crt" >"$WORK/report.txt" || rc=$?
  {
    echo "== upgrade-demo report"
    grep -v '^verdict:' "$WORK/report.txt"
    row "seeded, migrated, read back:" "$(awk '/^writes acknowledged:/ {print $3}' "$WORK/seed-check.txt")"
    row "room messages migrated, read back:" "$HISTORY_READ"
    row "R1→R3 current (s):" "$R3_SECS"
    row "rolling restart (s):" "$ROLL_SECS"
    row "verdict:" "$([ "$rc" = 0 ] && echo PASS || echo FAIL)"
    # A refused valid user is rare (and the work dir may be gone by the time anyone
    # looks): the nodes' own account of each refusal goes into the report.
    if ! grep -qE '^valid users denied: +0$' "$WORK/report.txt"; then
      dcompose logs --no-color --timestamps >"$WORK/nodes-after-upgrade.log" 2>&1 || true
      # In time order across nodes (the third field is the line's timestamp).
      echo "-- the nodes' refusals (their authenticators', and nats-server's own):"
      cat "$WORK"/n?-before-upgrade.log "$WORK/nodes-after-upgrade.log" |
        grep -E 'connection denied|authentication error|authorization' | sort -k3 || true
      echo "-- the nodes' store and callout warnings (last 30):"
      cat "$WORK"/n?-before-upgrade.log "$WORK/nodes-after-upgrade.log" |
        grep -E 'auth callout|store unavailable|quorum' | sort -k3 | tail -n 30 || true
    fi
  } | tee "$WORK/demo-report.txt"
  return "$rc"
}

# --- the partition ----------------------------------------------------------------------

partition_demo() {
  demo_setup partition
  local secs="${UNIBUS_PARTITION_SECS:-20}"
  docker image inspect "unibus:$TAG" >/dev/null 2>&1 || build "$TAG" >&2

  step "1. a three-node cluster at R3"
  cluster_up
  as_service cluster replicas 3 >/dev/null 2>&1 || die "cluster replicas 3 failed"

  step "2. workloads: one on the host against n1+n2, one inside n3 against n3 alone"
  start_workload "$WORK/majority.jsonl" "tls://127.0.0.1:$P1,tls://127.0.0.1:$P2"
  local c3 net="${DPROJECT}_bus" inner
  c3=$(container n3)
  # Inside n3, over its loopback: the only way to reach it while it is cut off.
  docker exec "$c3" /usr/local/bin/unibus workload run --server tls://127.0.0.1:4222 \
    --seed-file /secrets/admin.seed --ca /secrets/ca.crt --history /data/isolated.jsonl \
    --stop-file /data/isolated.stop --prefix iso >"$WORK/isolated.log" 2>&1 &
  inner=$!
  sleep 5

  step "3. cut n3 off the network for $secs s"
  local cut rejoin ready
  cut=$(now_ms)
  docker network disconnect "$net" "$c3"
  sleep "$secs"
  "$BIN" node status --http "127.0.0.1:${HTTP[1]}" >/dev/null 2>&1 ||
    die "n1 is not ready while n3 is cut off"
  docker exec "$c3" /usr/local/bin/unibus node status --http 127.0.0.1:8080 >"$WORK/n3-cut-status.txt" 2>&1 &&
    echo "   note: n3 still reported ready while cut off" >&2
  sed 's/^/   n3: /' "$WORK/n3-cut-status.txt" >&2

  step "4. reconnect n3; wait until it is ready and every replica current"
  rejoin=$(now_ms)
  docker network connect --alias n3 "$net" "$c3"
  wait_healthy n3 120
  ready=$(now_ms)
  wait_current 3 120
  local caught_up
  caught_up=$(awk "BEGIN { printf \"%.1f\", ($(now_ms) - $rejoin) / 1000 }")
  # n3's own writer is judged on its first acknowledged write after the rejoin: wait for
  # it (bounded) rather than a fixed pause, which a writer still in its retry back-off
  # could outlast. If it never comes, the check below fails the run, as it should.
  local deadline=$(($(date +%s) + 30))
  until docker cp "$c3:/data/isolated.jsonl" "$WORK/isolated.poll.jsonl" 2>/dev/null &&
    awk -v r="$rejoin" -F'"done_ms":' '/"ev":"write"/ && /"outcome":"acked"/ {
        split($2, v, ","); if (v[1] + 0 > r + 0) { found = 1 } } END { exit !found }' \
      "$WORK/isolated.poll.jsonl"; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "   n3's writer: no ack 30 s after n3 was current" >&2; break; }
    sleep 0.5
  done
  sleep 1

  step "5. stop the workloads and check both histories"
  : >"$WORK/isolated.stop"
  docker cp "$WORK/isolated.stop" "$c3:/data/isolated.stop"
  wait "$inner" || { cat "$WORK/isolated.log" >&2; die "the workload inside n3 failed"; }
  docker cp "$c3:/data/isolated.jsonl" "$WORK/isolated.jsonl"
  stop_workload "$WORK/majority.jsonl"
  local rc=0
  "$BIN" workload check --history "$WORK/majority.jsonl" --server "$SERVERS" \
    --seed-file "$DSECRETS/admin.seed" --ca "$DSECRETS/ca.crt" \
    --majority "$cut,$rejoin" >"$WORK/majority.txt" || rc=1
  "$BIN" workload check --history "$WORK/isolated.jsonl" --server "$SERVERS" \
    --seed-file "$DSECRETS/admin.seed" --ca "$DSECRETS/ca.crt" \
    --isolated "$cut,$rejoin,$ready" >"$WORK/isolated.txt" || rc=1
  {
    echo "== partition-demo report (n3 cut off for $secs s)"
    echo "-- n1+n2 (majority), from the host"
    cat "$WORK/majority.txt"
    echo "-- n3 (isolated), from inside it"
    cat "$WORK/isolated.txt"
    row "n3 caught up (s):" "$caught_up after the rejoin (ready, every replica current)"
    row "verdict:" "$([ "$rc" = 0 ] && echo PASS || echo FAIL)"
  } | tee "$WORK/demo-report.txt"
  return "$rc"
}
