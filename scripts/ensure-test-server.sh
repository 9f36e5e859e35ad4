#!/usr/bin/env bash
# Make sure Temporal's time-skipping test server is available for the tests of long timers
# (refund windows of days, review deadlines of hours). It is the Java build of
# io.temporal:temporal-test-server from Maven Central, run with the machine's Java; Debian's
# JDK and Maven are installed when missing. Cached in ~/.cache/paysentinel/test-server-<version>.
# Idempotent. Prints the path of the launcher the tests pass to
# WorkflowEnvironment.start_time_skipping(test_server_existing_path=...).
set -euo pipefail

VERSION="${PAYSENTINEL_TEST_SERVER_VERSION:-1.31.0}"
CACHE="${PAYSENTINEL_CACHE_DIR:-$HOME/.cache/paysentinel}/test-server-$VERSION"
LAUNCHER="$CACHE/temporal-test-server"

if [ -x "$LAUNCHER" ] && [ -f "$CACHE/lib/temporal-test-server-$VERSION.jar" ]; then
    echo "$LAUNCHER"
    exit 0
fi

missing=()
command -v java >/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure-test-server: FAILED: ${missing[*]} not installed and installing needs root" >&2
        echo "ensure-test-server: what to do: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "ensure-test-server: installing Debian's ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

mkdir -p "$CACHE"
cat > "$CACHE/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>paysentinel</groupId><artifactId>time-skipping-test-server</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>io.temporal</groupId><artifactId>temporal-test-server</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-nop</artifactId><version>2.0.16</version></dependency>
  </dependencies>
</project>
POM
echo "ensure-test-server: fetching io.temporal:temporal-test-server:$VERSION and its dependencies from Maven Central" >&2
if ! mvn -q -B -f "$CACHE/pom.xml" dependency:copy-dependencies -DoutputDirectory="$CACHE/lib" >"$CACHE/mvn.log" 2>&1; then
    echo "ensure-test-server: FAILED: Maven could not fetch the test server (log: $CACHE/mvn.log):" >&2
    tail -20 "$CACHE/mvn.log" >&2
    exit 1
fi
cat > "$LAUNCHER" <<LAUNCH
#!/bin/sh
# Temporal's time-skipping test server; the SDK passes the port as the first argument.
exec java -Xss1m -cp "$CACHE/lib/*" io.temporal.testserver.TestServer "\$@"
LAUNCH
chmod +x "$LAUNCHER"
echo "$LAUNCHER"
