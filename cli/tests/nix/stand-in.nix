# Stand-ins for the parts of nixpkgs that nix/module.nix and
# nix/kernel-recipe.nix use, so that cli/tests/nix_files.rs can evaluate
# them with nix-instantiate alone (nixpkgs cannot be fetched there).
#
# Each function has the shape of its nixpkgs namesake (mkOption returns its
# arguments tagged as an option, mkIf a tagged condition, a type carries a
# name and a check). A name the Nix files use and this file lacks is an
# evaluation error, so the test also pins which parts of lib they use.
{
  # The repository root, as an absolute path string.
  repo,
  # Values given to the module's options, over their defaults (JSON).
  overridesJson ? "{}",
}:
let
  inherit (builtins)
    all
    attrNames
    concatMap
    elem
    isAttrs
    isBool
    isInt
    isList
    isString
    listToAttrs
    map
    mapAttrs
    toJSON
    ;
  root = /. + repo;

  type = name: check: {
    _type = "option-type";
    inherit name check;
  };
  types = {
    bool = type "bool" isBool;
    str = type "str" isString;
    package = type "package" (v: isAttrs v && v ? name);
    enum = values: type "enum ${toJSON values}" (v: elem v values);
    listOf = t: type "listOf ${t.name}" (v: isList v && all t.check v);
    ints.between =
      lo: hi: type "ints.between ${toString lo} ${toString hi}" (v: isInt v && v >= lo && v <= hi);
  };

  recursiveUpdate =
    lhs: rhs:
    lhs
    // mapAttrs (
      name: v: if isAttrs v && isAttrs (lhs.${name} or null) then recursiveUpdate lhs.${name} v else v
    ) rhs;

  lib = {
    inherit types recursiveUpdate;
    kernel = {
      yes = {
        tristate = "y";
        optional = false;
      };
      no = {
        tristate = "n";
        optional = false;
      };
      module = {
        tristate = "m";
        optional = false;
      };
      freeform = x: {
        freeform = x;
        optional = false;
      };
    };
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: {
      _type = "option";
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    genAttrs =
      names: f:
      listToAttrs (
        map (n: {
          name = n;
          value = f n;
        }) names
      );
  };

  pkgs = {
    stdenv.hostPlatform.system = "x86_64-linux";
    formats.toml =
      { }:
      {
        type = type "toml value" isAttrs;
        # The value pkgs.formats.toml would write as TOML, kept as it is.
        generate = name: value: {
          _type = "toml-file";
          inherit name value;
        };
      };
    git.name = "git";
    openssh.name = "openssh";
    qemu_kvm.name = "qemu";
  };

  module = import (root + "/nix/module.nix") {
    packages.x86_64-linux.keystone.name = "keystone";
  };

  # Options never read the configuration.
  declared =
    (module {
      config = throw "an option declaration read config";
      inherit lib pkgs;
    }).options;

  isOption = v: isAttrs v && (v._type or null) == "option";
  # [ { path; type; default; described; defaultTypeChecks; } ]
  flatten =
    prefix: tree:
    concatMap (
      name:
      let
        v = tree.${name};
        path = if prefix == "" then name else "${prefix}.${name}";
      in
      if isOption v then
        [
          {
            inherit path;
            type = v.type.name;
            default = v.default;
            described = isString (v.description or null) && v.description != "";
            defaultTypeChecks = v.type.check v.default;
          }
        ]
      else
        flatten path v
    ) (attrNames tree);

  agentOptions = declared.keystone.agent;
  values =
    mapAttrs (_: o: o.default) agentOptions // { enable = true; } // builtins.fromJSON overridesJson;

  # Pushes mkIf down: a false condition drops the value.
  resolveIf =
    v:
    if isAttrs v && (v._type or null) == "if" then
      (if v.condition then resolveIf v.content else null)
    else if isAttrs v then
      mapAttrs (_: resolveIf) v
    else
      v;

  evaluated = resolveIf (module {
    config.keystone.agent = values;
    inherit lib pkgs;
  }).config;

  recipe = import (root + "/nix/kernel-recipe.nix") { inherit lib; };
in
{
  options = flatten "" declared;

  # Each option's value (defaults and overrides) against its type.
  valuesTypeCheck = mapAttrs (name: o: o.type.check values.${name}) agentOptions;

  config = evaluated;

  # The fragment parser itself, for texts the test makes up.
  parseFragment = recipe.parse "test.config";

  kernel = {
    inherit (recipe) structuredConfig kconfig localVersion checkScript;
    patches = map (p: {
      inherit (p) name;
      file = baseNameOf (toString p.patch);
    }) recipe.patches;
  };
}
