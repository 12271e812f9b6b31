ALTER TABLE comment
    ADD COLUMN distinguished boolean NOT NULL DEFAULT FALSE;

