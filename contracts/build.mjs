#!/usr/bin/env node
// Compiles contracts/src/BlockDeepNet.sol with the pinned solc-js (contracts/package.json) for evmVersion
// london and writes contracts/artifacts/BlockDeepNet.json deterministically.
//
//   node contracts/build.mjs           (from the repo root; or `npm run build` inside contracts/)
//   node contracts/build.mjs --check   recompile and exit 1 if the committed artifact differs
//
// Determinism: a relative source path, metadata.bytecodeHash "none" (no IPFS hash of the metadata, which
// would change with any comment or path), recursively sorted keys, no timestamps. The build also fails if
// the bytecode contains PUSH0 (0x5f, Shanghai): london-era QBFT chains reject it.
import { readFileSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

const CONTRACT = "BlockDeepNet";
const SOURCE = `src/${CONTRACT}.sol`;
const ARTIFACT = join(HERE, "artifacts", `${CONTRACT}.json`);
const EVM_VERSION = "london";
const OPTIMIZER = { enabled: true, runs: 200 };

function die(message) {
  process.stderr.write(`build.mjs: ${message}\n`);
  process.exit(1);
}

function loadSolc() {
  let solc;
  try {
    solc = require("solc");
  } catch {
    die(`solc is not installed: run \`npm ci --prefix ${relative(process.cwd(), HERE) || "."}\``);
  }
  const pinned = JSON.parse(readFileSync(join(HERE, "package.json"), "utf8")).dependencies.solc;
  const version = solc.version();
  if (!version.startsWith(`${pinned}+`)) {
    die(`installed solc ${version} is not the pinned ${pinned}: run \`npm ci\` in contracts/`);
  }
  return solc;
}

// Walks EVM code opcode by opcode, skipping PUSH1..PUSH32 immediates, so a 0x5f byte inside push data is
// not mistaken for PUSH0. The trailing CBOR metadata (its length is in the last two bytes) is data, not
// code, and is left out. Returns the offsets of PUSH0 opcodes.
export function findPush0(hex) {
  const code = Buffer.from(hex.replace(/^0x/, ""), "hex");
  let end = code.length;
  if (end >= 2) {
    const cborLength = code.readUInt16BE(end - 2);
    if (cborLength + 2 <= end) end -= cborLength + 2;
  }
  const found = [];
  for (let pc = 0; pc < end; pc++) {
    const op = code[pc];
    if (op === 0x5f) found.push(pc);
    else if (op >= 0x60 && op <= 0x7f) pc += op - 0x5f;
  }
  return found;
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((k) => [k, sortKeys(value[k])]),
    );
  }
  return value;
}

function compile(solc) {
  const input = {
    language: "Solidity",
    sources: { [SOURCE]: { content: readFileSync(join(HERE, SOURCE), "utf8") } },
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: OPTIMIZER,
      metadata: { bytecodeHash: "none" },
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const diagnostics = output.errors ?? [];
  for (const d of diagnostics) process.stderr.write(d.formattedMessage ?? `${d.severity}: ${d.message}\n`);
  if (diagnostics.some((d) => d.severity === "error")) die("compilation failed");

  const contract = output.contracts?.[SOURCE]?.[CONTRACT];
  if (!contract) die(`no contract ${CONTRACT} in ${SOURCE}`);
  const bytecode = `0x${contract.evm.bytecode.object}`;
  const deployedBytecode = `0x${contract.evm.deployedBytecode.object}`;
  for (const [name, code] of [
    ["bytecode", bytecode],
    ["deployedBytecode", deployedBytecode],
  ]) {
    const push0 = findPush0(code);
    if (push0.length) die(`${name} contains PUSH0 at offset(s) ${push0.join(", ")}: not valid on ${EVM_VERSION}`);
  }

  const artifact = {
    contractName: CONTRACT,
    abi: sortKeys(contract.abi),
    bytecode,
    deployedBytecode,
    compiler: { version: solc.version(), evmVersion: EVM_VERSION, optimizer: OPTIMIZER },
  };
  return `${JSON.stringify(artifact, null, 2)}\n`;
}

function main() {
  const check = process.argv.includes("--check");
  const unknown = process.argv.slice(2).filter((a) => a !== "--check");
  if (unknown.length) die(`unknown argument(s): ${unknown.join(" ")} (usage: build.mjs [--check])`);

  const text = compile(loadSolc());
  const shown = relative(process.cwd(), ARTIFACT) || ARTIFACT;
  if (check) {
    if (!existsSync(ARTIFACT)) die(`${shown} is missing: run \`node contracts/build.mjs\` and commit it`);
    if (readFileSync(ARTIFACT, "utf8") !== text) {
      die(`${shown} is stale (differs from a fresh compile): run \`node contracts/build.mjs\` and commit it`);
    }
    process.stdout.write(`${shown} is up to date\n`);
    return;
  }
  mkdirSync(dirname(ARTIFACT), { recursive: true });
  writeFileSync(ARTIFACT, text);
  process.stdout.write(`wrote ${shown}\n`);
}

// Run only as a script, so findPush0 can be imported (e.g. by a gas script) without compiling.
if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) main();
