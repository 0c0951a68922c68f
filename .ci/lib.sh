# Helpers shared by the .ci/ scripts (sourced, not run).
#   ci_step NAME CMD...   run CMD with a banner and its wall time; stop CI if it fails
#   ci_on_exit CMD        run CMD when the calling script exits, last registered first
#                         (stop a service, remove a temp dir), even when a step failed

CI_EXIT_CMDS=()

ci_on_exit() {
    CI_EXIT_CMDS=("$1" "${CI_EXIT_CMDS[@]}")
}

_ci_run_exit_cmds() {
    local rc=$? cmd
    for cmd in "${CI_EXIT_CMDS[@]}"; do
        eval "$cmd" || echo "ci: cleanup failed: $cmd" >&2
    done
    return $rc
}
trap _ci_run_exit_cmds EXIT

ci_step() {
    local name=$1 start rc=0
    shift
    echo
    echo "==== ${name}: $*"
    start=$(date +%s)
    "$@" || rc=$?
    echo "==== ${name}: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $(( $(date +%s) - start ))s"
    CI_TIMES+=("${name} $(( $(date +%s) - start ))s")
    return $rc
}
CI_TIMES=()
