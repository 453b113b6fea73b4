// SPDX-License-Identifier: Apache-2.0
// Exact pragma: the committed artifact is only reproducible with this compiler (see contracts/package.json).
pragma solidity 0.8.30;

/// @title BlockDeepNet learning + mining contract
/// @notice One contract with the two roles of the paper (Rathore, Pan, Park 2019):
///  - learning: the fleet's device registry and the record of every accepted local update
///    (hash of the encrypted payload, sample count, compute time), paying the data reward;
///  - mining: the edge gateway, the only miner, commits each round's aggregate (hash of the aggregate
///    ciphertexts + Merkle root of the accepted update hashes = the paper's candidate block) and takes the
///    processing reward.
/// @dev Devices hold no gas and run no node: they sign EIP-712 typed data, the gateway relays it, and this
///  contract recovers the signer itself, so a gateway cannot record an update that a device did not sign.
///  Compiled for evmVersion london (no PUSH0) so it runs on london-era QBFT chains (Besu, GoQuorum).
contract BlockDeepNet {
    // ------------------------------------------------------------------------------------------------
    // Types and storage
    // ------------------------------------------------------------------------------------------------

    /// @dev One slot per address (1 + 1 + 2 + 16 bytes). The reward balance shares the slot with the
    ///  registry flags on purpose: a registered device's slot is already non-zero, so crediting its data
    ///  reward is a warm non-zero -> non-zero write (2,900 gas) instead of a fresh slot (22,100 gas), and
    ///  the SLOAD that checks the registration pays for the access. uint128 wei is far above any ether supply.
    struct Account {
        bool registered;
        bool revoked;
        uint16 keyShareIndex;
        uint128 balance;
    }

    /// @dev Everything a submission reads and writes sits in one slot (8 + 4 + 8 + 1 = 21 bytes), so a
    ///  submit costs one cold SLOAD + one SSTORE for the round. deadlineBlock != 0 means "opened"
    ///  (openRound requires deadlineBlock > block.number >= 0).
    struct RoundMeta {
        uint64 deadlineBlock;
        uint32 count;
        uint64 totalSamples;
        bool committed;
    }

    /// @dev Bit offsets of the fields in the packed words above, as Solidity lays them out (first field in the
    ///  lowest-order bytes); submitUpdate reads and writes the words whole (see _accept).
    uint256 private constant _REVOKED_SHIFT = 8; // Account.revoked, after bool registered
    uint256 private constant _BALANCE_SHIFT = 32; // Account.balance, after bool, bool, uint16
    uint256 private constant _COUNT_SHIFT = 64; // RoundMeta.count, after uint64 deadlineBlock
    uint256 private constant _TOTAL_SHIFT = 96; // RoundMeta.totalSamples, after uint32 count
    uint256 private constant _COMMITTED_SHIFT = 160; // RoundMeta.committed, after uint64 totalSamples

    /// @dev The hashes live outside RoundMeta so that submissions never touch them.
    struct Round {
        RoundMeta meta;
        bytes32 baseModelHash;
        bytes32 aggregateHash;
        bytes32 merkleRoot;
    }

    /// @notice EIP-712 type of the message a device signs.
    bytes32 public constant UPDATE_TYPEHASH =
        keccak256("Update(uint64 round,bytes32 payloadHash,uint64 samples,uint64 computeMs)");
    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant _NAME_HASH = keccak256("BlockDeepNet");
    bytes32 private constant _VERSION_HASH = keccak256("1");
    /// @dev secp256k1n / 2: signatures with a larger s are the malleable twin of a valid one (EIP-2).
    uint256 private constant _HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    /// @notice The fleet admin and the only miner: registers devices, opens rounds, relays updates, commits.
    address public immutable gateway;
    /// @notice Data reward in wei per training sample of an accepted update.
    uint256 public immutable dataRewardPerSample;
    /// @notice Processing reward in wei paid to the gateway for each committed round.
    uint256 public immutable processingReward;

    /// @dev The domain separator is cached for the deployment chain and recomputed if the chain id
    ///  ever differs (a fork), so signatures from one chain never verify on another.
    bytes32 private immutable _cachedDomainSeparator;
    uint256 private immutable _cachedChainId;

    mapping(address => Account) private _accounts;
    mapping(uint64 => Round) private _rounds;
    mapping(uint64 => mapping(address => bytes32)) private _updates;

    // ------------------------------------------------------------------------------------------------
    // Events
    // ------------------------------------------------------------------------------------------------

    event Funded(address indexed from, uint256 amount);
    event DeviceRegistered(address indexed device, uint16 keyShareIndex);
    event DeviceRevoked(address indexed device);
    event RoundOpened(uint64 indexed round, bytes32 baseModelHash, uint64 deadlineBlock);
    event UpdateSubmitted(
        uint64 indexed round, address indexed device, bytes32 payloadHash, uint64 samples, uint64 computeMs
    );
    event GlobalCommitted(uint64 indexed round, bytes32 aggregateHash, bytes32 merkleRoot, uint32 count);
    event Withdrawn(address indexed account, uint256 amount);

    // ------------------------------------------------------------------------------------------------
    // Errors
    // ------------------------------------------------------------------------------------------------

    error NotGateway();
    error ZeroAddress();
    error AlreadyRegistered(address device);
    error BadSignature();
    error UnknownDevice(address device);
    error DeviceIsRevoked(address device);
    error RoundAlreadyOpened(uint64 round);
    error DeadlineNotInFuture(uint64 deadlineBlock, uint64 currentBlock);
    error RoundNotOpen(uint64 round);
    error LateSubmission(uint64 round, uint64 deadlineBlock);
    error RoundAlreadyCommitted(uint64 round);
    error DuplicateSubmission(uint64 round, address device);
    error ZeroSamples();
    /// @dev A zero payload hash would be indistinguishable from "no update" and so defeat the duplicate check.
    error ZeroPayloadHash();
    error GlobalAlreadyCommitted(uint64 round);
    error CountMismatch(uint32 expected, uint32 got);
    error BalanceOverflow();
    error RoundOverflow(uint64 round);
    error RewardTooLarge();
    error NothingToWithdraw();
    error InsufficientPool(uint256 available, uint256 owed);
    error TransferFailed();

    modifier onlyGateway() {
        if (msg.sender != gateway) revert NotGateway();
        _;
    }

    /// @param dataRewardPerSample_ wei credited per sample of each accepted update (the data reward).
    /// @param processingReward_ wei credited to the gateway per committed round (the processing reward).
    /// @dev Rates above 2^128 - 1 wei are refused: balances are uint128 and the bookkeeping relies on it.
    constructor(uint256 dataRewardPerSample_, uint256 processingReward_) {
        if (dataRewardPerSample_ > type(uint128).max || processingReward_ > type(uint128).max) {
            revert RewardTooLarge();
        }
        gateway = msg.sender;
        dataRewardPerSample = dataRewardPerSample_;
        processingReward = processingReward_;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
    }

    // ------------------------------------------------------------------------------------------------
    // Reward pool
    // ------------------------------------------------------------------------------------------------

    /// @notice Adds ether to the reward pool (anyone may fund it). The pool is this contract's balance.
    function fund() external payable {
        emit Funded(msg.sender, msg.value);
    }

    receive() external payable {
        emit Funded(msg.sender, msg.value);
    }

    // ------------------------------------------------------------------------------------------------
    // Learning role: device registry
    // ------------------------------------------------------------------------------------------------

    /// @notice Registers a device key. `keyShareIndex` is its threshold-Paillier share index, 0 = not a holder.
    /// @dev An address is registered at most once: a revoked key stays revoked (enrol a new key instead),
    ///  so a leaked key cannot be brought back by a mistaken re-registration.
    function registerDevice(address device, uint16 keyShareIndex) external onlyGateway {
        if (device == address(0)) revert ZeroAddress();
        Account storage a = _accounts[device];
        if (a.registered) revert AlreadyRegistered(device);
        a.registered = true;
        a.keyShareIndex = keyShareIndex;
        emit DeviceRegistered(device, keyShareIndex);
    }

    /// @notice Revokes a device key: its later submissions are rejected. Rewards already earned stay withdrawable.
    function revokeDevice(address device) external onlyGateway {
        Account storage a = _accounts[device];
        if (!a.registered) revert UnknownDevice(device);
        if (a.revoked) revert DeviceIsRevoked(device);
        a.revoked = true;
        emit DeviceRevoked(device);
    }

    function deviceInfo(address device) external view returns (bool registered, bool revoked, uint16 keyShareIndex) {
        Account storage a = _accounts[device];
        return (a.registered, a.revoked, a.keyShareIndex);
    }

    // ------------------------------------------------------------------------------------------------
    // Learning role: rounds and updates
    // ------------------------------------------------------------------------------------------------

    /// @notice Opens `round` on top of the global model `baseModelHash`; updates are accepted up to and
    ///  including block `deadlineBlock`.
    function openRound(uint64 round, bytes32 baseModelHash, uint64 deadlineBlock) external onlyGateway {
        Round storage r = _rounds[round];
        if (r.meta.deadlineBlock != 0) revert RoundAlreadyOpened(round);
        if (deadlineBlock <= block.number) revert DeadlineNotInFuture(deadlineBlock, uint64(block.number));
        r.meta.deadlineBlock = deadlineBlock;
        r.baseModelHash = baseModelHash;
        emit RoundOpened(round, baseModelHash, deadlineBlock);
    }

    /// @notice Records a device's signed update, relayed by the gateway, and credits its data reward.
    /// @param device the device the gateway says signed the update; the contract checks it.
    /// @param signature the device's 65-byte (r, s, v) signature over `updateDigest(...)`.
    /// @dev Naming the device and checking the recovered signer against it (rather than taking whatever
    ///  address recovers) keeps the rejections distinct: a forged signature, or one over other values, fails
    ///  as BadSignature; a genuine signature of an unregistered key as UnknownDevice; a genuine signature
    ///  over another round's claim, relayed as that round, as RoundNotOpen or LateSubmission. Check order is
    ///  part of the interface (the relay maps errors to receipt codes).
    function submitUpdate(
        uint64 round,
        address device,
        bytes32 payloadHash,
        uint64 samples,
        uint64 computeMs,
        bytes calldata signature
    ) external onlyGateway {
        if (_recover(updateDigest(round, payloadHash, samples, computeMs), signature) != device) {
            revert BadSignature();
        }
        _accept(round, device, payloadHash, samples);
        emit UpdateSubmitted(round, device, payloadHash, samples, computeMs);
    }

    // ------------------------------------------------------------------------------------------------
    // Mining role
    // ------------------------------------------------------------------------------------------------

    /// @notice Commits the round's global block: the hash of the aggregate ciphertexts and the Merkle root
    ///  of the accepted update hashes, and credits the processing reward to the gateway.
    /// @dev `count` must match the number of updates this contract accepted, so a gateway cannot silently
    ///  drop or add updates. The Merkle root itself is checked off chain (`bdn audit`) from the per-device
    ///  hashes recorded here; verifying it on chain would make the gas grow with the number of updates.
    function commitGlobal(uint64 round, bytes32 aggregateHash, bytes32 merkleRoot, uint32 count)
        external
        onlyGateway
    {
        Round storage r = _rounds[round];
        RoundMeta memory meta = r.meta;
        if (meta.deadlineBlock == 0) revert RoundNotOpen(round);
        if (meta.committed) revert GlobalAlreadyCommitted(round);
        if (count != meta.count) revert CountMismatch(meta.count, count);

        r.meta.committed = true;
        r.aggregateHash = aggregateHash;
        r.merkleRoot = merkleRoot;

        Account storage g = _accounts[msg.sender];
        g.balance = _add128(g.balance, processingReward);

        emit GlobalCommitted(round, aggregateHash, merkleRoot, count);
    }

    // ------------------------------------------------------------------------------------------------
    // Rewards
    // ------------------------------------------------------------------------------------------------

    /// @notice Reward balance (wei) of `account`, payable by `withdraw` while the pool covers it.
    function balanceOf(address account) external view returns (uint256) {
        return _accounts[account].balance;
    }

    /// @notice Pays the caller's whole reward balance in ether from the pool.
    /// @dev Checks-effects-interactions: the balance is zeroed before the call, so re-entering finds nothing.
    function withdraw() external {
        Account storage a = _accounts[msg.sender];
        uint256 owed = a.balance;
        if (owed == 0) revert NothingToWithdraw();
        uint256 available = address(this).balance;
        if (available < owed) revert InsufficientPool(available, owed);
        a.balance = 0;
        emit Withdrawn(msg.sender, owed);
        (bool ok,) = msg.sender.call{value: owed}("");
        if (!ok) revert TransferFailed();
    }

    // ------------------------------------------------------------------------------------------------
    // Views for verification
    // ------------------------------------------------------------------------------------------------

    function getRound(uint64 round)
        external
        view
        returns (
            bytes32 baseModelHash,
            uint64 deadlineBlock,
            uint32 count,
            uint64 totalSamples,
            bool committed,
            bytes32 aggregateHash,
            bytes32 merkleRoot
        )
    {
        Round storage r = _rounds[round];
        RoundMeta memory meta = r.meta;
        return (
            r.baseModelHash,
            meta.deadlineBlock,
            meta.count,
            meta.totalSamples,
            meta.committed,
            r.aggregateHash,
            r.merkleRoot
        );
    }

    /// @notice Payload hash of `device`'s accepted update in `round`, zero if none.
    function getUpdate(uint64 round, address device) external view returns (bytes32 payloadHash) {
        return _updates[round][device];
    }

    /// @notice EIP-712 domain separator: name "BlockDeepNet", version "1", this chain, this contract.
    function domainSeparator() public view returns (bytes32) {
        return block.chainid == _cachedChainId ? _cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @notice The EIP-712 digest a device signs for an update.
    function updateDigest(uint64 round, bytes32 payloadHash, uint64 samples, uint64 computeMs)
        public
        view
        returns (bytes32 digest)
    {
        bytes32 typeHash = UPDATE_TYPEHASH;
        bytes32 separator = domainSeparator();
        // abi.encode + abi.encodePacked in scratch memory past the free pointer (nothing is allocated).
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, typeHash)
            mstore(add(p, 0x20), round)
            mstore(add(p, 0x40), payloadHash)
            mstore(add(p, 0x60), samples)
            mstore(add(p, 0x80), computeMs)
            let structHash := keccak256(p, 0xa0)
            mstore(p, hex"1901")
            mstore(add(p, 0x02), separator)
            mstore(add(p, 0x22), structHash)
            digest := keccak256(p, 0x42)
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------------------------------------

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _NAME_HASH, _VERSION_HASH, block.chainid, address(this)));
    }

    /// @dev ecrecover with the checks it does not do itself: exactly 65 bytes, v in {27, 28}, low s (EIP-2),
    ///  and a non-zero result (ecrecover returns 0 for an invalid point instead of failing).
    function _recover(bytes32 digest, bytes calldata signature) private view returns (address signer) {
        if (signature.length != 65) revert BadSignature();
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            r := calldataload(signature.offset)
            s := calldataload(add(signature.offset, 32))
            v := byte(0, calldataload(add(signature.offset, 64)))
        }
        if (uint256(s) > _HALF_N || (v != 27 && v != 28)) revert BadSignature();
        // The ecrecover precompile (0x01) called directly: its output slot is cleared first because it
        // returns nothing, rather than zero, for a signature that matches no key.
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, digest)
            mstore(add(p, 0x20), v)
            mstore(add(p, 0x40), r)
            mstore(add(p, 0x60), s)
            mstore(0x00, 0)
            pop(staticcall(gas(), 0x01, p, 0x80, 0x00, 0x20))
            signer := mload(0x00)
        }
        if (signer == address(0)) revert BadSignature();
    }

    /// @dev The checks after the signature, and the bookkeeping, of submitUpdate (a separate function only
    ///  to keep the stack shallow). The two packed slots are read and written as whole words, one SLOAD +
    ///  one SSTORE each: field-wise struct access made the legacy optimizer re-read and re-mask them.
    function _accept(uint64 round, address device, bytes32 payloadHash, uint64 samples) private {
        Account storage a = _accounts[device];
        RoundMeta storage m = _rounds[round].meta;
        uint256 acc;
        uint256 meta;
        assembly ("memory-safe") {
            acc := sload(a.slot)
            meta := sload(m.slot)
        }
        if (acc & 0xff == 0) revert UnknownDevice(device);
        if ((acc >> _REVOKED_SHIFT) & 0xff != 0) revert DeviceIsRevoked(device);

        uint64 deadline = uint64(meta);
        if (deadline == 0) revert RoundNotOpen(round);
        if (block.number > deadline) revert LateSubmission(round, deadline);
        if ((meta >> _COMMITTED_SHIFT) & 0xff != 0) revert RoundAlreadyCommitted(round);

        mapping(address => bytes32) storage roundUpdates = _updates[round];
        if (roundUpdates[device] != bytes32(0)) revert DuplicateSubmission(round, device);
        if (samples == 0) revert ZeroSamples();
        if (payloadHash == bytes32(0)) revert ZeroPayloadHash();

        unchecked {
            // Nothing here can wrap a uint256: count < 2^33, total < 2^65, and the balance sum < 2^193 since
            // balance < 2^128, samples < 2^64 and the constructor caps dataRewardPerSample below 2^128.
            // The explicit range checks stand in for the checked arithmetic of the packed fields.
            uint256 count = ((meta >> _COUNT_SHIFT) & type(uint32).max) + 1;
            uint256 total = ((meta >> _TOTAL_SHIFT) & type(uint64).max) + samples;
            if (count > type(uint32).max || total > type(uint64).max) revert RoundOverflow(round);
            meta = (meta & ~(uint256(type(uint96).max) << _COUNT_SHIFT)) | (count << _COUNT_SHIFT)
                | (total << _TOTAL_SHIFT);
            uint256 balance = (acc >> _BALANCE_SHIFT) + samples * dataRewardPerSample;
            if (balance > type(uint128).max) revert BalanceOverflow();
            acc = (acc & ((1 << _BALANCE_SHIFT) - 1)) | (balance << _BALANCE_SHIFT);
        }

        roundUpdates[device] = payloadHash;
        assembly ("memory-safe") {
            sstore(a.slot, acc)
            sstore(m.slot, meta)
        }
    }

    function _add128(uint128 balance, uint256 credit) private pure returns (uint128) {
        uint256 sum = uint256(balance) + credit;
        if (sum > type(uint128).max) revert BalanceOverflow();
        return uint128(sum);
    }
}
