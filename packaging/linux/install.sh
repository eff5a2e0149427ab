#!/bin/sh
# Install the built cakep2p app for this user: menu entries, hicolor icons, a `cakep2p` link on PATH,
# and (with --service) the systemd user unit for a headless node. Nothing outside PREFIX is touched.
#
#   packaging/linux/install.sh                      # uses dist/cakep2p/ from `python packaging/build.py`
#   packaging/linux/install.sh --bundle DIR         # another copy of the app folder (it is used in place)
#   packaging/linux/install.sh --service            # also ~/.config/systemd/user/cakep2p-serve.service
#   packaging/linux/install.sh --uninstall
# PREFIX defaults to ~/.local (set PREFIX=/some/dir to stage elsewhere; the unit goes to
# $XDG_CONFIG_HOME/systemd/user, default ~/.config/systemd/user).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
prefix=${PREFIX:-$HOME/.local}
unit_dir=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
bundle=$repo/dist/cakep2p
service=no
uninstall=no

while [ $# -gt 0 ]; do
    case $1 in
        --bundle) bundle=$2; shift 2 ;;
        --service) service=yes; shift ;;
        --uninstall) uninstall=yes; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

applications=$prefix/share/applications
icons=$prefix/share/icons/hicolor
sizes="16 32 48 64 128 256 512"

refresh_caches() {
    if command -v update-desktop-database >/dev/null 2>&1; then update-desktop-database -q "$applications" || true; fi
    if command -v gtk-update-icon-cache >/dev/null 2>&1; then gtk-update-icon-cache -q -t "$icons" || true; fi
}

if [ "$uninstall" = yes ]; then
    rm -f "$applications/cakep2p.desktop" "$applications/cakep2p-serve.desktop" "$prefix/bin/cakep2p"
    for size in $sizes; do rm -f "$icons/${size}x${size}/apps/cakep2p.png"; done
    rm -f "$icons/scalable/apps/cakep2p.svg"
    if [ -f "$unit_dir/cakep2p-serve.service" ]; then
        echo "install.sh: stop the node first: systemctl --user disable --now cakep2p-serve"
        rm -f "$unit_dir/cakep2p-serve.service"
    fi
    refresh_caches
    echo "install.sh: removed cakep2p from $prefix (the app folder and your data are left alone)"
    exit 0
fi

if [ ! -x "$bundle/cakep2p" ]; then
    echo "install.sh: no app at $bundle/cakep2p; build it first: python packaging/build.py" >&2
    exit 2
fi
bundle=$(cd "$bundle" && pwd)
binary=$prefix/bin/cakep2p

mkdir -p "$applications" "$prefix/bin" "$icons/scalable/apps"
ln -sf "$bundle/cakep2p" "$binary"
for size in $sizes; do
    mkdir -p "$icons/${size}x${size}/apps"
    cp "$here/../icons/cakep2p-$size.png" "$icons/${size}x${size}/apps/cakep2p.png"
done
cp "$here/../icons/cakep2p.svg" "$icons/scalable/apps/cakep2p.svg"
# Menu entries run the app by absolute path: a desktop session's PATH often lacks ~/.local/bin.
for entry in cakep2p.desktop cakep2p-serve.desktop; do
    sed "s|^Exec=cakep2p|Exec=$binary|" "$here/$entry" > "$applications/$entry"
done
if [ "$service" = yes ]; then
    mkdir -p "$unit_dir"
    sed "s|^ExecStart=%h/.local/bin/cakep2p|ExecStart=$binary|" "$here/cakep2p-serve.service" \
        > "$unit_dir/cakep2p-serve.service"
    echo "install.sh: start the node with: systemctl --user daemon-reload && systemctl --user enable --now cakep2p-serve"
fi
refresh_caches
echo "install.sh: installed $binary -> $bundle/cakep2p, menu entries in $applications, icons in $icons"

# The window's system libraries, which the app leaves to the system: Qt's X11 plugin needs them on a minimal
# Debian/Ubuntu (the same list as cakep2p/commands/display.py WINDOW_PACKAGES; `cakep2p --serve` needs none).
window_packages="libegl1 libgl1 libopengl0 libglx0 libfontconfig1 libglib2.0-0 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xkb1 libxcb-shape0 libxcb-randr0 libx11-xcb1"
plugin=$(find "$bundle" -path '*platforms*' -name libqxcb.so 2>/dev/null | head -n 1)
if [ -n "$plugin" ] && command -v ldd >/dev/null 2>&1; then
    missing=$(ldd "$plugin" 2>/dev/null | awk '/=> not found/ {print $1}' | grep -v '^libQt6' | sort -u | tr '\n' ' ')
    # Qt opens libxcb-cursor with dlopen at start, so ldd cannot see it
    if command -v ldconfig >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libxcb-cursor\.so\.0'; then
        missing="${missing}libxcb-cursor.so.0 "
    fi
    if [ -n "$missing" ]; then
        echo "install.sh: the window needs system libraries this machine lacks (${missing% }):" \
             "sudo apt install $window_packages (the headless node, cakep2p --serve, needs none)" >&2
    fi
fi
