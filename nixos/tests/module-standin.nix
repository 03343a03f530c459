# A stand-in for the NixOS module system, just enough to evaluate ClawOS's modules on a
# machine that cannot fetch nixpkgs: option declarations with defaults and types, the
# settings checked against them (an error names the option), mkIf, assertions, and the
# `config` several modules produce, merged. It is a test harness, not nixpkgs' lib:
# what it checks is the modules' own logic, not NixOS's handling of the result.
let
  inherit (builtins) attrNames concatStringsSep isAttrs isList isString isInt isBool
    listToAttrs mapAttrs toJSON elem foldl' hasAttr filter;
  isOption = v: isAttrs v && (v._type or null) == "option";
  isIf = v: isAttrs v && (v._type or null) == "if";
  show = path: concatStringsSep "." path;
  plain = name: check: { _type = "type"; inherit name check; merge = _: v: v; };
  checkValue = path: t: v:
    if t.check v then t.merge path v
    else throw "The option `${show path}' is not of type ${t.name}: ${toJSON v}";
  types = {
    str = plain "string" isString;
    bool = plain "boolean" isBool;
    path = plain "path" (v: builtins.isPath v || (isString v && builtins.substring 0 1 v == "/"));
    package = plain "package" (v: isAttrs v || isString v);
    ints.positive = plain "positive integer" (v: isInt v && v > 0);
    enum = values: plain "one of ${toJSON values}" (v: elem v values);
    listOf = t: {
      _type = "type";
      name = "list of ${t.name}";
      check = isList;
      merge = path: v: builtins.genList (i: checkValue (path ++ [ "[${toString i}]" ]) t (builtins.elemAt v i)) (builtins.length v);
    };
    nullOr = t: {
      _type = "type";
      name = "null or ${t.name}";
      check = v: v == null || t.check v;
      merge = path: v: if v == null then null else checkValue path t v;
    };
    attrsOf = t: {
      _type = "type";
      name = "attribute set of ${t.name}";
      check = isAttrs;
      merge = path: v: mapAttrs (n: x: checkValue (path ++ [ n ]) t x) v;
    };
    submodule = m: {
      _type = "type";
      name = "submodule";
      check = isAttrs;
      merge = path: v: evalOptions path m.options v;
    };
  };
  # The value of every option under `opts`, from `settings` or the default; a setting
  # no option declares is an error.
  evalOptions = path: opts: settings:
    let
      unknown = filter (n: !(hasAttr n opts)) (attrNames settings);
    in
    if unknown != [ ] then throw "The option `${show (path ++ [ (builtins.head unknown) ])}' does not exist."
    else mapAttrs
      (n: o:
        let p = path ++ [ n ]; in
        if isOption o then
          (if hasAttr n settings then checkValue p o.type settings.${n}
           else if o ? default then o.default
           else throw "The option `${show p}' is used but not defined.")
        else evalOptions p o (settings.${n} or { }))
      opts;
  optionPaths = path: opts: builtins.concatLists (map
    (n: let o = opts.${n}; p = path ++ [ n ]; in
      if isOption o then [ (show p) ] else optionPaths p o)
    (attrNames opts));
  # Option trees and produced configs merge recursively; lists concatenate.
  merge = a: b:
    if isAttrs a && isAttrs b && !(isOption a) then
      a // mapAttrs (n: v: if hasAttr n a then merge a.${n} v else v) b
    else if isList a && isList b then a ++ b
    else b;
  resolve = v:
    if isIf v then (if v.condition then resolve v.content else { })
    else if isAttrs v then mapAttrs (_: resolve) v
    else v;
  lib = {
    inherit types;
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = what: lib.mkOption { type = types.bool; default = false; description = "Whether to enable ${what}."; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    inherit concatStringsSep;
    concatMap = builtins.concatMap;
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    optionalAttrs = c: a: if c then a else { };
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: a: listToAttrs (map (n: f n a.${n}) (attrNames a));
    inherit mapAttrs;
    mapAttrsToList = f: a: map (n: f n a.${n}) (attrNames a);
    recursiveUpdate = a: b:
      a // mapAttrs (n: v: if hasAttr n a && isAttrs a.${n} && isAttrs v then lib.recursiveUpdate a.${n} v else v) b;
  };
in
{
  inherit lib;
  evalModules = { modules, settings }:
    let
      results = map (m: import m { inherit config lib; pkgs = { }; }) modules;
      options = foldl' merge { } (map (r: r.options or { }) results);
      config = evalOptions [ ] options settings;
      produced = foldl' merge { } (map (r: resolve (r.config or { })) results);
      failed = filter (a: !a.assertion) (produced.assertions or [ ]);
    in
    if failed != [ ] then throw (builtins.head failed).message
    else {
      inherit config;
      produced = removeAttrs produced [ "assertions" ];
      options = optionPaths [ ] options;
    };
}
