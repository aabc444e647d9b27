#!/usr/bin/env bash
# The dependency graph between src/'s top-level modules (the concerns), from
# the `crate::` paths in code (comments and doc links are not dependencies),
# and whether it is a DAG. Prints one "from -> to" edge a line, then the
# modules in dependency order (each only uses those before it), or the
# circle(s) tsort found and exits 1. It also checks the order src/lib.rs
# declares the modules in (the order its module list explains them in):
# an edge from a module to one declared after it is reported, exit 1.
# ARCHITECTURE.md's code map cites it.
# Usage: docs/scripts/module-graph.sh [--dot]
set -euo pipefail
cd "$(dirname "$0")/../.."
edges=$(
    find src -name '*.rs' ! -path 'src/bin/*' ! -name lib.rs | sort | while read -r file; do
        rel=${file#src/}
        from=${rel%%/*}
        from=${from%.rs}
        # Code only: drop whole-line comments and trailing ones.
        sed -e 's#^\s*//.*##' -e 's#\s//.*##' "$file" |
            grep -o 'crate::[a-z_][a-z0-9_]*' | sed 's/crate:://' | sort -u |
            while read -r to; do
                [ "$to" != "$from" ] && echo "$from $to"
            done || true
    done | sort -u
)
if [ "${1:-}" = --dot ]; then
    echo 'digraph modules {'
    echo "$edges" | awk '{ printf "    \"%s\" -> \"%s\";\n", $1, $2 }'
    echo '}'
    exit 0
fi
echo "$edges" | awk '{ print $1 " -> " $2 }'
echo
# tsort wants "before after"; a module comes after what it uses.
if order=$(echo "$edges" | awk '{ print $2, $1 }' | tsort 2>/tmp/module-graph.$$); then
    rm -f /tmp/module-graph.$$
    echo "a DAG; in dependency order:" $order
else
    echo "NOT a DAG:"
    grep -v '^tsort: -: input contains a loop:$' /tmp/module-graph.$$ | sed 's/^tsort: /  /' | sort -u
    rm -f /tmp/module-graph.$$
    exit 1
fi
declared=$(sed -n 's/^\(pub \)\{0,1\}mod \([a-z_]*\);$/\2/p' src/lib.rs)
echo "src/lib.rs declares:" $declared
upward=$(echo "$edges" | awk -v declared="$declared" '
    BEGIN { n = split(declared, names, /[ \n]+/); for (i = 1; i <= n; i++) place[names[i]] = i }
    !($1 in place) || !($2 in place) { print "  " $1 " -> " $2 " (not declared in src/lib.rs)"; next }
    place[$2] > place[$1] { print "  " $1 " -> " $2 " (uses a module declared after it)" }')
if [ -n "$upward" ]; then
    echo "out of src/lib.rs's order:"
    echo "$upward"
    exit 1
fi
echo "every module uses only modules declared before it"
