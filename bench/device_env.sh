# Sourced at the start of a device run: unpacks the carried runtime packages (bench/carry.sh)
# outside the system directories and points the loader at them.
[ -f .carry/bin.tar.xz ] && tar -C .carry -xJf .carry/bin.tar.xz
for f in .carry/deb/*.deb; do [ -f "$f" ] && dpkg -x "$f" /tmp/carried-libs; done
export LD_LIBRARY_PATH=/tmp/carried-libs/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
