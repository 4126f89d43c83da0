"""Writes one novel of Debian's r-cran-janeaustenr package as plain text (see PROVENANCE.md).

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb pkg
    python3 extract_janeaustenr.py pkg/usr/lib/R/site-library/janeaustenr/data prideprejudice \
        > pride-and-prejudice.txt && gzip -9 -n pride-and-prejudice.txt

The package keeps each novel as a character vector (one element per line of the Project
Gutenberg text) in R's lazy-load database (Rdata.rdx: gzip-compressed index, Rdata.rdb: one
zlib-compressed XDR serialisation per object). This reads just enough of R's serialisation
format for that, with no R installed; the lines are joined with newlines.
"""
import gzip
import struct
import sys
import zlib


class Reader:
    def __init__(self, data):
        self.data, self.pos, self.symbols = data, 0, []

    def int(self):
        (value,) = struct.unpack(">i", self.data[self.pos:self.pos + 4])
        self.pos += 4
        return value

    def start(self):
        assert self.data[:2] == b"X\n", "not an XDR serialisation"
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            length = self.int()  # of the native encoding's name
            self.pos += length
        return self.item()

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, (flags >> 9) & 1, (flags >> 10) & 1
        if kind == 254:  # NILVALUE
            return None
        if kind == 1:  # SYMSXP, remembered for later references
            self.symbols.append(self.item())
            return self.symbols[-1]
        if kind == 255:  # REFSXP
            return self.symbols[(flags >> 8) - 1]
        if kind == 2:  # LISTSXP (attributes): [(tag, value)]
            pairs = []
            while kind == 2:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                pairs.append((tag, self.item()))
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, (flags >> 9) & 1, (flags >> 10) & 1
            assert kind == 254, kind
            return dict(pairs)
        if kind == 9:  # CHARSXP
            length = self.int()
            if length == -1:
                return None
            text = self.data[self.pos:self.pos + length].decode("utf-8")
            self.pos += length
            return text
        if kind in (16, 19):  # STRSXP, VECSXP
            values = [self.item() for _ in range(self.int())]
        elif kind in (10, 13):  # LGLSXP, INTSXP
            values = [self.int() for _ in range(self.int())]
        else:
            raise ValueError(f"R type {kind} at byte {self.pos}")
        attributes = self.item() if has_attr else None
        return (values, attributes)


def main(data_dir, name):
    with open(f"{data_dir}/Rdata.rdx", "rb") as f:
        (variables, _references, _compressed), _ = Reader(gzip.decompress(f.read())).start()
    positions, attributes = variables
    offset, length = dict(zip(attributes["names"][0], positions))[name][0]
    with open(f"{data_dir}/Rdata.rdb", "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    lines, _ = Reader(zlib.decompress(blob[4:])).start()
    sys.stdout.write("\n".join(line or "" for line in lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
