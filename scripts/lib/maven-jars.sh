# Sourced by scripts/stack and scripts/debezium: fetches a set of Maven Central artifacts,
# with their runtime dependencies, into one directory for `java -cp 'DIR/*'`, once.
#
#   fetch_maven_jars LIB_DIR NAME group:artifact:version...
#
# LIB_DIR/.complete marks a finished fetch; a lock beside LIB_DIR keeps two runs (CI's
# parallel jobs, a test and the demo) from fetching into it at once. Maven's own
# repository (~/.m2) caches the downloads themselves. Needs log and die from the caller.

fetch_maven_jars() {
    local lib=$1 name=$2; shift 2
    [[ -f "$lib/.complete" ]] && return 0
    if ! command -v mvn >/dev/null; then
        apt_install maven
    fi
    local home; home=$(dirname "$lib")
    mkdir -p "$home"
    exec 7>"$home/fetch.lock"
    flock 7
    if [[ -f "$lib/.complete" ]]; then
        exec 7>&-
        return 0
    fi
    local pom="$home/pom.xml" deps="" coord g a v
    for coord in "$@"; do
        IFS=: read -r g a v <<<"$coord"
        deps+="    <dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>"$'\n'
    done
    rm -rf "$lib"
    mkdir -p "$lib"
    cat >"$pom" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.outbox-relay</groupId>
  <artifactId>$name</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
$deps  </dependencies>
</project>
POM
    log "fetching $name jars from Maven Central into $lib"
    if ! mvn -B -q -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$lib" >"$home/mvn.log" 2>&1 </dev/null 7>&- 8>&- 9>&-; then
        tail -n 30 "$home/mvn.log" >&2 || true
        die "mvn could not fetch $name (log: $home/mvn.log)"
    fi
    # Kafka 4.x and Connect log through SLF4J 1.7: an SLF4J 2 API beside the 1.x binding
    # would silence every log line, so refuse such a set rather than run blind.
    if compgen -G "$lib/slf4j-api-2.*.jar" >/dev/null && compgen -G "$lib/log4j-slf4j-impl-*.jar" >/dev/null; then
        die "the $name jars hold an SLF4J 2 API beside log4j-slf4j-impl (SLF4J 1.x): nothing would be logged"
    fi
    touch "$lib/.complete"
    exec 7>&-
}
