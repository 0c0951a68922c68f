# Headless Chromium for the dashboard tests (tests/serve/test_dashboard.py): the Debian packages
# `chromium` and `chromium-driver`, driven by Selenium with the SYSTEM browser and driver (no
# browser download). Each test starts and stops its own browser through chromedriver, so this
# only installs and exports where the binaries are; nothing keeps running.
# Sourced by .ci/services (see its header): check each command, `return 1` on failure.
_sudo=""
if [ "$(id -u)" -ne 0 ]; then _sudo="sudo"; fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    DEBIAN_FRONTEND=noninteractive $_sudo apt-get update -qq || return 1
    DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core >/dev/null || return 1
fi
TRUSTMOE_TEST_CHROMIUM="$(command -v chromium)" || return 1
TRUSTMOE_TEST_CHROMEDRIVER="$(command -v chromedriver)" || return 1
export TRUSTMOE_TEST_CHROMIUM TRUSTMOE_TEST_CHROMEDRIVER
echo "chromium: $("$TRUSTMOE_TEST_CHROMIUM" --version 2>/dev/null | head -1)"
unset _sudo
