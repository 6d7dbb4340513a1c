from sluice_common.users import TOKEN_PREFIX, hash_token, new_token


def test_tokens_are_random_prefixed_and_long() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert token.startswith(TOKEN_PREFIX)
        assert len(token) >= len(TOKEN_PREFIX) + 43  # 32 random bytes, base64url


def test_hash_is_stable_and_hides_the_token() -> None:
    token = new_token()
    assert hash_token(token) == hash_token(token)
    assert hash_token(token) != hash_token(new_token())
    assert token.encode() not in hash_token(token)
    assert len(hash_token(token)) == 32
