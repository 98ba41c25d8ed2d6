# quiet_pip CMD...: pip's output without known notices, everything else (errors included) as it
# comes; a failing pip still stops the caller (pipefail). Sourced by setup.sh and setup_vllm.sh.
# * "WARNING: Location ... is ignored", printed when a --target/--prefix setting in the
#   environment points elsewhere;
# * "WARNING: Skipping X as it is not installed.", from an uninstall of what is already gone;
# * setuptools' "Editable installation." notice, a block from its BuildBackendWarning line to
#   the second "!!" line and the source line after it.
quiet_pip() {
  "$@" 2>&1 | awk '
    /^WARNING: Location / { next }
    /^WARNING: Skipping .* as it is not installed/ { next }
    /BuildBackendWarning: Editable installation\./ { skip = 1; bangs = 0; next }
    skip == 1 { if ($1 == "!!" && ++bangs == 2) skip = 2; next }
    skip == 2 { skip = 0; next }
    { print }
  '
}
