# The guest kernel recipe, read from the files guest-image/kernel/build.sh
# uses, so that the Nix build and the Debian build cannot drift apart:
#
# - keystone.config, the fragment build.sh merges over `make tinyconfig`,
#   parsed into nixpkgs' structured kernel config (`structuredConfig`, the
#   form of `structuredExtraConfig`: `{ HZ_100 = lib.kernel.yes; ... }`)
#   and into manual-config's flat form (`kconfig`: `{ CONFIG_HZ_100 = "y"; }`);
# - patches/*.patch, as `kernelPatches` entries sorted by file name;
# - `checkScript`, shell that fails when a line of the fragment did not
#   survive `make olddefconfig` (the check build.sh makes).
#
# Pure: it needs only `lib.kernel` (yes, no, module, freeform) and builtins,
# so it evaluates without nixpkgs.
{
  lib,
  recipeDir ? ../guest-image/kernel,
}:
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elemAt
    filter
    foldl'
    fromJSON
    hasAttr
    isString
    listToAttrs
    map
    match
    readDir
    readFile
    sort
    split
    substring
    stringLength
    ;
  k = lib.kernel;

  fragmentFile = recipeDir + "/keystone.config";
  patchDir = recipeDir + "/patches";

  # One value of the fragment: y, n and m are tristates; anything else (a
  # number, a quoted string, a hex value) is written as it stands.
  valueOf =
    text:
    if text == "y" then
      k.yes
    else if text == "n" then
      k.no
    else if text == "m" then
      k.module
    else
      k.freeform text;

  # One line: `{ name = "HZ_100"; value = ...; }`, or null for a blank line
  # or a comment. A line that is neither throws, naming the line.
  parseLine =
    fileName: line:
    let
      set = match "CONFIG_([A-Za-z0-9_]+)=(.+)" line;
      unset = match "# CONFIG_([A-Za-z0-9_]+) is not set" line;
    in
    if set != null then
      {
        name = elemAt set 0;
        value = valueOf (elemAt set 1);
      }
    else if unset != null then
      {
        name = elemAt unset 0;
        value = k.no;
      }
    else if match "[[:space:]]*" line != null || match "#.*" line != null then
      null
    else
      throw "${fileName}: cannot read the line '${line}' (expected CONFIG_X=value, '# CONFIG_X is not set', a comment or a blank line)";

  # Text of a fragment -> structured config. An option set twice throws:
  # merge_config.sh would keep the last, build.sh's check would fail.
  parse =
    fileName: text:
    let
      lines = filter isString (split "\n" text);
      entries = filter (e: e != null) (map (parseLine fileName) lines);
      checkOnce =
        seen: e:
        if hasAttr e.name seen then
          throw "${fileName}: CONFIG_${e.name} is set twice"
        else
          seen // { ${e.name} = true; };
    in
    builtins.seq (foldl' checkOnce { } entries) (listToAttrs entries);

  # A structured value as it appears in .config.
  textOf = v: if v ? freeform then v.freeform else v.tristate;

  structuredConfig = parse "guest-image/kernel/keystone.config" (readFile fragmentFile);

  kconfig = listToAttrs (
    map (name: {
      name = "CONFIG_${name}";
      value = textOf structuredConfig.${name};
    }) (attrNames structuredConfig)
  );

  isPatch =
    name: type:
    type == "regular"
    && stringLength name > 6
    && substring (stringLength name - 6) 6 name == ".patch";

  patchFiles =
    let
      entries = readDir patchDir;
    in
    sort (a: b: a < b) (filter (n: isPatch n entries.${n}) (attrNames entries));

  patches = map (file: {
    name = substring 0 (stringLength file - 6) file;
    patch = patchDir + "/${file}";
  }) patchFiles;

  # Shell quoting for a single-quoted word.
  quote = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";

  checkOne =
    name:
    let
      v = structuredConfig.${name};
      line = "CONFIG_${name}=${textOf v}";
    in
    if textOf v == "n" then
      "if grep -q ${quote "^CONFIG_${name}="} .config; then echo ${quote "error: kernel config kept CONFIG_${name} on"} >&2; missing=1; fi\n"
    else
      "grep -qxF ${quote line} .config || { echo ${quote "error: kernel config lost '${line}'"} >&2; missing=1; }\n";
in
{
  inherit
    parse
    structuredConfig
    kconfig
    patches
    fragmentFile
    ;

  # CONFIG_LOCALVERSION without its quotes ("" when the fragment has none):
  # the suffix of the kernel release, hence of modDirVersion.
  localVersion =
    if structuredConfig ? LOCALVERSION then fromJSON structuredConfig.LOCALVERSION.freeform else "";

  # Run in the kernel tree after `make olddefconfig`; exits 3 when a line
  # of the fragment did not survive.
  checkScript =
    "missing=0\n"
    + concatStringsSep "" (map checkOne (attrNames structuredConfig))
    + "[ \"$missing\" = 0 ] || exit 3\n";
}
