# Turns native/pack/host_pack.c (path in argv[1]) into the x-face experiment: -DXB8 (8 blocks per
# iteration for every size), -DXB1 (one block per iteration up to 16 B), -DXMERGE=9 (8-byte stores kept apart).
import sys
p = sys.argv[1]
s = open(p).read()
old = "#define BATCH(B) ((B) <= 16 ? 16 : 8)\n"
assert old in s, "BATCH line moved"
s = s.replace(old, "#if defined(XB8)\n#define BATCH(B) 8\n#elif defined(XB1)\n#define BATCH(B) ((B) <= 16 ? 1 : 8)\n"
              "#else\n#define BATCH(B) ((B) <= 16 ? 16 : 8)\n#endif\n")
old = "        if (B < 8) __asm__(\"\" : \"+r\"(p)); \\\n"
assert old in s, "UNMERGED moved"
s = s.replace(old, "        if (B < XMERGE) __asm__(\"\" : \"+r\"(p)); \\\n")
s = s.replace("#define UNMERGED(B, p)", "#ifndef XMERGE\n#define XMERGE 8\n#endif\n#define UNMERGED(B, p)")
open(p, "w").write(s)
