ALTER TABLE oauth2_access_token_session ALTER COLUMN signature TYPE VARCHAR(768);
