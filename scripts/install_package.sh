# Sourced by the main jobs (run_demo.sh, run_vision_demo.sh): install_package "<imports>" installs this package
# editable with $PYTHON; when every module of <imports> already imports, without touching the network.
install_package() {
    echo "== install (pip install -e .)"
    if "$PYTHON" -c "import $1" 2>/dev/null; then
        # Dependencies are present: install the package alone, without touching the network.
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    else
        "$PYTHON" -m pip install -q -e .
    fi
}
